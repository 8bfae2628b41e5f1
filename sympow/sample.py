"""Generate text from a trained run: prints the prompt, then the new text as it comes.

    python -m sympow.sample runs/default --prompt "def main(" --max-new-tokens 200 --temperature 0.8 --top-k 50
    python -m sympow.sample runs/default --prompt "import os" --prompt "class A:"     # a batch of two
    python -m sympow.sample runs/default --prompt-file prompts.txt                   # one prompt per line

Loads the run's latest checkpoint (or a checkpoint folder), tokenises the prompt with GPT-2 BPE
after an end-of-text token (as every training window starts), prefills it in one call, then
runs one jitted decode step per token (sympow.generate does the same as one compiled loop; here
each token is printed as soon as it is drawn). The tokens per second at the end count the decode
steps only. A softmax model decodes with a key/value cache
of --max-length tokens, by default the context it was trained at; a sympow model with its state,
at any length.

Several prompts (--prompt repeated, or one per non-empty line of --prompt-file) run as one batch
of prompts of different lengths (Transformer.prefill's lengths), and each is printed with its
continuation when all are done. A single prompt with line breaks: --prompt "$(cat FILE)".
"""

import argparse
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from sympow import checkpoint, cli
from sympow.data.tokenizer import encoding_for
from sympow.generate import sample_token


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(
        prog="python -m sympow.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a run folder (its latest checkpoint) or a checkpoint folder")
    parser.add_argument("--prompt", action="append", help="the text to continue (repeat it for a batch)")
    parser.add_argument(
        "--prompt-file", type=Path, help="read the prompts (UTF-8) from this file instead, one per non-empty line"
    )
    parser.add_argument("--max-new-tokens", type=cli.non_negative(int), default=100)
    parser.add_argument("--temperature", type=cli.non_negative(float), default=1.0, help="0 is greedy")
    parser.add_argument("--top-k", type=cli.positive(int), default=None)
    parser.add_argument("--top-p", type=cli.number(float, 0, strict=True, maximum=1), default=None)
    parser.add_argument("--seed", type=cli.non_negative(int), default=0)
    parser.add_argument(
        "--max-length",
        type=cli.positive(int),
        default=None,
        help="a softmax model's key/value cache, in tokens (default: its training context)",
    )
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.prompt_file is None):
        parser.refuse("give the prompt as --prompt TEXT or --prompt-file FILE (one of the two)")
    return args


def read_prompts(args) -> list[str]:
    try:
        prompts = args.prompt if args.prompt is not None else args.prompt_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        cli.refuse(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte {error.start}: {error.reason})")
    except OSError as error:
        cli.refuse(f"--prompt-file {args.prompt_file} cannot be read ({error.strerror})")
    if args.prompt_file is not None:
        prompts = [line for line in prompts if line.strip()]
    if not prompts or not all(prompts):
        cli.refuse("the prompt is empty: generation needs at least one token to continue")
    return prompts


def cache_length(model, saved: dict, args, needed: int) -> int:
    """Tokens a key/value cache must hold; for a model that decodes with its state, just `needed`."""
    if model.blocks[0].attention.holds_state:
        return needed
    length = args.max_length or saved.get("args", {}).get("context") or needed
    if needed > length:
        raise SystemExit(
            f"the prompt ({needed - args.max_new_tokens} tokens) and {args.max_new_tokens} new tokens do not fit this "
            f"{model.config.attention} model's key/value cache of {length} tokens: shorten them, or raise --max-length"
        )
    return length


def load(run: Path):
    try:
        return checkpoint.load_model(run)
    except FileNotFoundError as error:
        raise SystemExit(f"{error}: train one first, e.g. python train.py --out {run}") from None
    except checkpoint.DamagedCheckpoint as error:
        raise SystemExit(str(error)) from None


class Printer:
    """Prints the text of the tokens so far as it grows (live) or keeps it for the end, holding
    back an incomplete UTF-8 character."""

    def __init__(self, encoding, live: bool):
        self.encoding, self.live, self.tokens, self.printed = encoding, live, [], 0

    def text(self) -> str:
        return self.encoding.decode_bytes(self.tokens).decode("utf-8", errors="ignore")

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if not self.live:
            return
        text = self.text()
        if len(text) > self.printed:
            sys.stdout.write(text[self.printed :])
            sys.stdout.flush()
            self.printed = len(text)


def main(argv=None) -> None:
    args = parse_args(argv)
    prompts = read_prompts(args)
    model, saved = load(args.run)
    try:
        encoding, end_of_text = encoding_for(model.config.vocab_size)
    except ValueError as error:
        raise SystemExit(f"{args.run}: {error}") from None
    # Training inputs start with end-of-text (a window shifted right), so each prompt does too.
    rows = [[end_of_text, *encoding.encode(prompt, allowed_special="all")] for prompt in prompts]
    longest = max(len(row) for row in rows)
    max_length = cache_length(model, saved, args, longest + args.max_new_tokens)
    tokens = jnp.asarray([row + [end_of_text] * (longest - len(row)) for row in rows], jnp.int32)  # right-padded
    lengths = jnp.asarray([len(row) for row in rows], jnp.int32)

    prefill = eqx.filter_jit(lambda m, t, n: m.prefill(t, max_length, n))
    decode = jax.jit(lambda m, t, c: m.decode(t, c), donate_argnums=2)  # the cache is updated in place
    sample = jax.jit(lambda logits, key: sample_token(logits, key, args.temperature, args.top_k, args.top_p))
    live = len(prompts) == 1
    if live:
        print(prompts[0], end="", flush=True)
    logits, cache = prefill(model, tokens, lengths)
    printers, key = [Printer(encoding, live) for _ in prompts], jax.random.key(args.seed)
    start, steps = None, 0
    for i in range(args.max_new_tokens):
        key, draw = jax.random.split(key)
        token = sample(logits, draw)
        for printer, drawn in zip(printers, token.tolist()):
            printer.add(drawn)
        if i + 1 < args.max_new_tokens:
            logits, cache = decode(model, token, cache)
            if start is None:  # the first step compiles
                logits.block_until_ready()
                start = time.perf_counter()
            else:
                steps += 1
    if not live:
        for number, (prompt, printer) in enumerate(zip(prompts, printers), 1):
            print(f"=== prompt {number} of {len(prompts)} ===\n{prompt}{printer.text()}\n")
    elapsed = time.perf_counter() - start if start else 0.0
    rate = (
        f"{steps * len(prompts) / elapsed:.1f} tokens/s (sampling and printing included)"
        if steps and elapsed > 0
        else "too few tokens to time"
    )
    batch = "" if live else f" for each of {len(prompts)} prompts in one batch"
    print(
        f"\n\n[{args.max_new_tokens} new tokens{batch} from a {model.config.attention} model, {rate} once compiled]",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
