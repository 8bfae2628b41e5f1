"""What a trained gate keeps: each head's gamma on heldout sequences of a gated run, and the
memory it implies.

    python experiments/gate_memory.py RUN [RUN ...] [--period 32] [--sequences 16]

For every layer and head of each run (sympow_gated or conformal): the mean gamma_t over
heldout sequences of the run's training context, its memory 1 / (1 - mean gamma) in tokens, and
the product of gamma over --period tokens (the part of the state that survives that long; an
episode of the recall stream is 4 x pairs tokens), and the mean gamma at each offset in the
period, which shows whether the gate forgets at a boundary or decays uniformly.
"""

import argparse
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from sympow import checkpoint, data


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--period", type=int, default=32, help="tokens over which to multiply gamma")
    parser.add_argument("--sequences", type=int, default=16, help="heldout sequences to average over")
    return parser.parse_args(argv)


def log_gates(model, tokens) -> list[np.ndarray]:
    """Each layer's log gamma on the tokens, [batch, seq, heads]."""
    x, gates = model.lookup(tokens), []
    for block in model.blocks:
        gates.append(np.asarray(block.attention.gate(block.attention_norm(x))))
        x = block(x)
    return gates


def gate_memory(run: Path, period: int, sequences: int) -> dict:
    try:
        model, saved = checkpoint.load_model(run)
    except (FileNotFoundError, checkpoint.DamagedCheckpoint) as error:
        raise SystemExit(str(error)) from None
    if not model.config.gated:
        raise SystemExit(f"{run}: a {model.config.attention} model has no gate")
    args = saved["args"]
    if not 1 <= period <= args["context"]:
        raise SystemExit(f"--period {period} must be in 1..{args['context']} (the run's training context)")
    stream = data.open_stream(args["data"], "heldout", args["context"], sequences, vocab_size=model.config.vocab_size)
    inputs, _, _ = stream.next_batch()
    layers = []
    for log_g in log_gates(model, jnp.asarray(inputs)):
        batch, seq, heads = log_g.shape
        periods = log_g[:, : seq // period * period].reshape(batch, -1, period, heads)
        gamma = np.exp(log_g).mean(axis=(0, 1))
        layers.append(
            dict(
                mean_gamma=gamma.tolist(),
                memory_tokens=(1 / np.maximum(1 - gamma, 1e-9)).tolist(),
                kept_over_period=np.exp(periods.sum(2)).mean((0, 1)).tolist(),
                gamma_by_offset=np.exp(periods).mean((0, 1)).T.tolist(),  # [heads, period]
            )
        )
    return dict(run=str(run), step=saved["step"], period=period, layers=layers)


def main(argv=None) -> None:
    args = parse_args(argv)
    for run in args.runs:
        result = gate_memory(run, args.period, args.sequences)
        print(f"{run} (step {result['step']}): mean gamma, memory, kept over {args.period} tokens, gamma by offset")
        for layer, figures in enumerate(result["layers"]):
            rows = zip(figures["mean_gamma"], figures["memory_tokens"], figures["kept_over_period"])
            for head, (gamma, memory, kept) in enumerate(rows):
                offsets = " ".join(f"{g:.2f}" for g in figures["gamma_by_offset"][head])
                print(f"  layer {layer} head {head}: {gamma:.4f}, {memory:.0f} tokens, {kept:.3f}; {offsets}")


if __name__ == "__main__":
    main()
