"""Decoding and prefill, side by side in one run: per-token decode time and cache bytes for the
four variants at several contexts, for the tiny and 124m presets (p = 2), batch 1; and prefill
tokens per second for the tiny preset.

    .venv/bin/python benchmarks/decode.py                      # writes benchmarks/decode.json and .png
    .venv/bin/python benchmarks/decode.py --presets 124m --contexts 65536 --kv-heads 12 4 1 \
        --out benchmarks/decode_grouped.json                   # grouped key/value heads
    .venv/bin/python benchmarks/decode.py --presets tiny --contexts 1024 --ragged 8 \
        --out benchmarks/decode_ragged.json                    # a batch of 8 prompts against 8 calls

A decode measurement starts from a cache filled synthetically to the context length: a short
prompt is prefilled, then a key/value cache is filled with random keys and values up to the
context and its length and rotary position set there, and a state cache has its position set
there (a state's size and cost do not depend on how many tokens it holds). Prefilling 64K tokens
of softmax (its O(T^2) weights) or of the 124m model would take hours on a CPU. Each decode time
is the median of --steps jitted steps, with the cache donated (updated in place) as in
generation; each prefill time the median of --repeats calls after a compiling one, and its
memory the temporaries XLA's compiled prefill allocates (beyond the model and the tokens).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sympow  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--presets", nargs="+", default=["tiny", "124m"])
    parser.add_argument("--attentions", nargs="+", default=list(sympow.ATTENTIONS))
    parser.add_argument(
        "--kv-heads", type=int, nargs="+", default=[None], help="key/value heads of each model (default: one per head)"
    )
    parser.add_argument("--steps", type=int, default=50, help="decode steps timed per case")
    parser.add_argument("--repeats", type=int, default=3, help="prefill calls timed per case")
    parser.add_argument(
        "--max-prefill-softmax", type=int, default=16384, help="longest softmax prefill (its weights are O(T^2) memory)"
    )
    parser.add_argument(
        "--ragged",
        type=int,
        default=0,
        help="also time sympow.generate on a batch of this many prompts of different lengths against one call "
        "per prompt (each preset and attention; 0: not)",
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt in --ragged")
    parser.add_argument("--out", type=Path, default=HERE / "decode.json")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG and the table from --out's JSON")
    return parser.parse_args(argv)


def cache_bytes(cache) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(cache))


def at_context(cache, context: int, key):
    """The cache as if it held `context` tokens (see the module docstring)."""
    position = (jnp.full_like(cache.position[0], float(context)), jnp.zeros_like(cache.position[1]))
    if isinstance(cache, sympow.StateCache):
        return cache._replace(position=position)
    fill = lambda a, key: jax.random.normal(key, a.shape, a.dtype)  # noqa: E731
    k_key, v_key = jax.random.split(key)
    keys = cache.cache._replace(
        k=fill(cache.cache.k, k_key), v=fill(cache.cache.v, v_key), length=jnp.full_like(cache.cache.length, context)
    )
    return cache._replace(cache=keys, position=position)


def time_decode(model, context: int, steps: int) -> dict:
    prompt = jnp.zeros((1, 16), jnp.int32)
    _, cache = eqx.filter_jit(lambda m, t: m.prefill(t, context + steps + 1))(model, prompt)
    cache = tuple(at_context(layer, context, jax.random.key(i)) for i, layer in enumerate(cache))
    size = cache_bytes(cache)
    # The token is made inside: every argument but the model is donated.
    decode = eqx.filter_jit(lambda m, c: m.decode(jnp.zeros((1,), jnp.int32), c), donate="all-except-first")
    logits, cache = decode(model, cache)  # compiles
    logits.block_until_ready()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits, cache = decode(model, cache)
        logits.block_until_ready()
        times.append(time.perf_counter() - start)
    return dict(decode_ms=1e3 * statistics.median(times), cache_bytes=size)


def time_prefill(model, context: int, repeats: int) -> dict:
    tokens = jax.random.randint(jax.random.key(0), (1, context), 0, model.config.vocab_size)
    prefill = jax.jit(lambda m, t: m.prefill(t)).lower(model, tokens).compile()
    temporary = prefill.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(prefill(model, tokens))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(prefill(model, tokens))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return dict(prefill_s=seconds, prefill_tokens_per_s=context / seconds, prefill_temp_bytes=temporary)


def time_ragged_generation(model, prompts: int, new_tokens: int) -> dict:
    """Generated tokens per second: one sympow.generate call on `prompts` prompts of different
    lengths (16, 32, .. tokens, right-padded) against one call per prompt, each compiled first
    (a call per prompt length: each compiles once)."""
    lengths = [16 * (i + 1) for i in range(prompts)]
    padded = jax.random.randint(jax.random.key(0), (prompts, max(lengths)), 0, model.config.vocab_size)

    def seconds(run) -> float:
        """The median of 3 calls after a compiling one."""
        jax.block_until_ready(run())
        times = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(run())
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    key = jax.random.key(1)
    batched = seconds(lambda: sympow.generate(model, padded, new_tokens, key=key, lengths=jnp.asarray(lengths)))
    alone = sum(seconds(lambda n=n: sympow.generate(model, padded[:1, :n], new_tokens, key=key)) for n in lengths)
    return dict(
        prompts=prompts,
        prompt_lengths=lengths,
        new_tokens=new_tokens,
        batched_tokens_per_s=prompts * new_tokens / batched,
        one_by_one_tokens_per_s=prompts * new_tokens / alone,
    )


def cases(args):
    for preset in args.presets:
        for attention in args.attentions:
            for kv_heads in args.kv_heads:
                for context in args.contexts:
                    yield preset, attention, kv_heads, context


def processor() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    return names[0] if names else platform.processor() or platform.machine()


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        results = json.loads(args.out.read_text())
        print(table(results["cases"]))
        return plot(results, args.out.with_suffix(".png"))
    machine = f"{processor()}, {os.cpu_count()} cores; jax {jax.__version__} on {jax.default_backend()}"
    results = dict(
        command=" ".join(["benchmarks/decode.py", *(argv or sys.argv[1:])]),
        machine=machine,
        dtype="float32",
        batch=1,
        cases=[],
    )
    models = {}
    for preset, attention, kv_heads, context in tqdm(list(cases(args)), desc="decode benchmark"):
        if (preset, attention, kv_heads) not in models:
            models.clear()  # one model in memory at a time
            config = sympow.preset(preset, attention=attention, p=2, n_kv_heads=kv_heads)
            models[preset, attention, kv_heads] = sympow.Transformer(config, key=jax.random.key(0))
        model = models[preset, attention, kv_heads]
        case = dict(preset=preset, attention=attention, kv_heads=model.config.kv_heads, context=context)
        case.update(time_decode(model, context, args.steps))
        if preset == "tiny" and (attention != "softmax" or context <= args.max_prefill_softmax):
            case.update(time_prefill(model, context, args.repeats))
        if args.ragged and context == args.contexts[0]:
            case["ragged"] = time_ragged_generation(model, args.ragged, args.new_tokens)
        results["cases"].append(case)
        tqdm.write(json.dumps(case))
        args.out.write_text(json.dumps(results, indent=1))
    print(table(results["cases"]))
    plot(results, args.out.with_suffix(".png"))


def model_of(case) -> tuple:
    """(preset, attention, key/value heads): runs before grouped heads recorded none (one per head)."""
    return case["preset"], case["attention"], case.get("kv_heads", sympow.PRESETS[case["preset"]]["n_heads"])


def table(cases) -> str:
    by_key = {(*model_of(c), c["context"]): c for c in cases}
    rows = [
        "| preset | attention | kv heads | context | decode ms/token | vs its shortest context | cache MB"
        " | prefill tokens/s | prefill temporaries MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        first = by_key[(*model_of(c), min(k[3] for k in by_key if k[:3] == model_of(c)))]
        prefill = (
            f"{c['prefill_tokens_per_s']:,.0f} | {c['prefill_temp_bytes'] / 1e6:,.0f}"
            if "prefill_tokens_per_s" in c
            else "not run | not run"
        )
        rows.append(
            f"| {c['preset']} | {c['attention']} | {model_of(c)[2]} | {c['context']:,} | {c['decode_ms']:.2f} | "
            f"{c['decode_ms'] / first['decode_ms']:.2f}x | "
            f"{c['cache_bytes'] / 1e6:,.1f} | {prefill} |"
        )
    ragged = [c for c in cases if "ragged" in c]
    if ragged:
        rows += [
            "",
            "| preset | attention | kv heads | prompts (lengths) | new tokens each | tokens/s, one batch"
            " | tokens/s, one call per prompt | ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in ragged:
            r = c["ragged"]
            rows.append(
                f"| {c['preset']} | {c['attention']} | {model_of(c)[2]} | {r['prompts']} "
                f"({r['prompt_lengths'][0]}..{r['prompt_lengths'][-1]}) | {r['new_tokens']} | "
                f"{r['batched_tokens_per_s']:,.0f} | {r['one_by_one_tokens_per_s']:,.0f} | "
                f"{r['batched_tokens_per_s'] / r['one_by_one_tokens_per_s']:.1f}x |"
            )
    return "\n".join(rows)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = dict(zip(sympow.ATTENTIONS, ("tab:orange", "tab:blue", "tab:green", "tab:red")))
    markers = dict(zip(sorted({model_of(c)[2] for c in results["cases"]}, reverse=True), "osD^v"))
    for preset, attention, kv_heads in sorted({model_of(c) for c in results["cases"]}):
        cases = [c for c in results["cases"] if model_of(c) == (preset, attention, kv_heads)]
        style = dict(
            linestyle="-" if preset == "124m" else "--",
            marker=markers[kv_heads],
            color=colours[attention],
            label=f"{attention} ({preset}, {kv_heads} kv heads)",
        )
        contexts = [c["context"] for c in cases]
        axes[0].plot(contexts, [c["decode_ms"] for c in cases], **style)
        axes[1].plot(contexts, [c["cache_bytes"] / 1e6 for c in cases], **style)
        prefilled = [c for c in cases if "prefill_tokens_per_s" in c]
        if prefilled:
            axes[2].plot([c["context"] for c in prefilled], [c["prefill_tokens_per_s"] for c in prefilled], **style)
    titles = ("decode time per token (ms)", "cache size (MB)", "prefill tokens per second (tiny)")
    for axis, title in zip(axes, titles):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context (tokens)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    for axis in axes:
        if axis.lines:  # the prefill panel is empty when no case prefilled
            axis.legend(fontsize=7)
    figure.suptitle(f"batch 1, float32, {results['machine']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
