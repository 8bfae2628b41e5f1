"""Recall against state size: plain multi-query associative recall (Zoology's MQAR), one
episode per sequence, with the attention state's bytes on the x axis (the plot of Zoology and
Based). Every pair is needed to the end, so nothing can be forgotten: the state must hold them
all, and a gate cannot help (sympow_gated is the control).

    python experiments/recall_state.py                        # the quick grid: 4 runs at width 64, 19 minutes
    python experiments/recall_state.py --grid full            # docs/experiments.md's grid: 12 runs, 3 to 5 minutes each
    python experiments/recall_state.py --grid full --pairs 8 16 32 --seeds 0 1 --out experiments/state_more
    python experiments/recall_state.py --grid full --d-model 64 --head-dims 8 4 --out experiments/state_width64

Each (variant, head dim, pairs, learning rate, seed) is one `train.py` run of the recall preset
with 4 heads of the given dim (d_model = 4 x dim), or with --d-model fixed, d_model / dim heads
(the state shrinks with the head dim while the model's width stays), and one `eval.py` at the training context on
fresh heldout sequences. By default a sequence is the N pairs then their N queries (context
4N): a one-layer model learns that within the budget where, with filler between the queries,
it did not (docs/experiments.md). The state of a sympow layer is S [D, dim] and z [D] per head, D =
C(dim + p - 1, p), in float32; a softmax layer's key/value cache at the context is 2 x context x
d_model floats. Rerunning skips finished runs, resumes interrupted ones and continues every run
to a larger --steps. Writes OUT/results.json, OUT/table.md (the best learning rate per point)
and accuracy_by_state.png.
"""

import argparse
from pathlib import Path

import matplotlib
import numpy as np
from runs import (
    ROOT,
    VARIANTS,
    accuracy,
    add_grid_option,
    best_per_point,
    fill_from_grid,
    hold_settings,
    run_grid,
    save_table,
    slug,
    train_and_evaluate,
    values_in,
    variant_flags,
    variants_in,
)

from ops import embedding_size

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

HEADS = 4  # without --d-model
FLOAT_BYTES = 4


# quick: at a fixed width of 64, p = 2 states of 10 KB (8 heads of 8, D = 36) and 3.2 KB (16
# heads of 4, D = 10) against softmax's caches. 2000 steps: at 1000 a p = 2 run may still be on
# its plateau (docs/experiments.md, section 2), and which is luck.
GRIDS = dict(
    quick=dict(
        out=ROOT / "experiments" / "quick" / "recall_state",
        variants=["softmax", "sympow p=2"],
        head_dims=[8, 4],
        d_model=64,
        steps=2000,
    ),
    full=dict(
        out=ROOT / "experiments" / "recall_state",
        variants=["softmax", "sympow p=2", "sympow p=4", "sympow_gated p=2"],
        head_dims=[8, 16, 32],
        d_model=None,
        steps=1000,
    ),
)

# What sets every run of a folder besides its grid's axes (runs.hold_settings).
SETTINGS = ("d_model", "keys", "values", "context", "tokens_per_update", "eval_sequences")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_option(parser, GRIDS)
    parser.add_argument("--out", type=Path, help="default: the grid's folder")
    parser.add_argument("--variants", nargs="+", help="default: the grid's")
    parser.add_argument("--head-dims", nargs="+", type=int, help="default: the grid's")
    parser.add_argument("--d-model", type=int, help="a fixed width: d_model / head dim heads")
    parser.add_argument("--pairs", nargs="+", type=int, default=[16], help="key-value pairs a sequence")
    parser.add_argument("--keys", type=int, default=32, help="keys to draw each sequence's pairs from")
    parser.add_argument("--values", type=int, default=16)
    parser.add_argument("--context", type=int, help="default: 4 x pairs, the queries right after the pairs (no filler)")
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, help="default: the grid's")
    parser.add_argument("--tokens-per-update", type=int, default=8192)
    parser.add_argument("--eval-sequences", type=int, default=128)
    args = fill_from_grid(parser.parse_args(argv), GRIDS)
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    if too_many := [n for n in args.pairs if 4 * n > context(args, n) + 1 or n > args.keys]:
        parser.error(f"pairs {too_many} do not fit --context {args.context} (4 tokens a pair) or --keys {args.keys}")
    if args.d_model and (bad := [d for d in args.head_dims if args.d_model % d]):
        parser.error(f"head dims {bad} do not divide --d-model {args.d_model}")
    return args


def heads(args, head_dim: int) -> int:
    return args.d_model // head_dim if args.d_model else HEADS


def context(args, pairs: int) -> int:
    return args.context or 4 * pairs


def state_bytes(variant: str, head_dim: int, context: int, heads: int = HEADS) -> int:
    """Bytes of one layer's attention state: S and z per head, or a softmax key/value cache at the context."""
    attention, p = VARIANTS[variant]
    if attention == "softmax":
        return 2 * context * heads * head_dim * FLOAT_BYTES
    return heads * embedding_size(head_dim, p) * (head_dim + 1) * FLOAT_BYTES


def run_name(variant: str, head_dim: int, pairs: int, lr: float, seed: int) -> str:
    return f"{slug(variant)}-dim{head_dim}-N{pairs}-lr{lr:g}-seed{seed}"


def train_and_evaluate_point(args, variant: str, head_dim: int, pairs: int, lr: float, seed: int) -> dict:
    task = f"mqar:pairs={pairs},keys={args.keys},values={args.values}"
    train = ["--preset", "recall", "--data", task, *variant_flags(variant), "--context", str(context(args, pairs))]
    train += ["--d-model", str(heads(args, head_dim) * head_dim), "--heads", str(heads(args, head_dim))]
    train += ["--lr", str(lr), "--seed", str(seed), "--tokens-per-update", str(args.tokens_per_update)]
    train += ["--warmup", "20", "--log-every", "50", "--checkpoint-every", "200"]
    evaluate = ["--context", str(context(args, pairs)), "--windows", str(args.eval_sequences), "--bins", "8"]
    name = run_name(variant, head_dim, pairs, lr, seed)
    result, metrics = train_and_evaluate(args.out, name, train, evaluate, args.steps)
    return dict(
        variant=variant,
        head_dim=head_dim,
        pairs=pairs,
        lr=lr,
        seed=seed,
        steps=args.steps,
        context=context(args, pairs),
        heads=heads(args, head_dim),
        state_bytes=state_bytes(variant, head_dim, context(args, pairs), heads(args, head_dim)),
        train_accuracy=[(r["step"], r["accuracy"]) for r in metrics if "accuracy" in r],
        accuracy=accuracy(result, 0, context(args, pairs)),
    )


def write_table(args, records: list[dict], best: dict) -> str:
    width = f"d_model {args.d_model}" if args.d_model else f"{HEADS} heads"
    lines = [
        f"`mqar:pairs=N,keys={args.keys},values={args.values}`, context {args.context or '4N'}, recall preset with "
        f"{width}, {args.steps} steps of {args.tokens_per_update} tokens, learning rates {values_in(records, 'lr')} "
        f"(best per point shown), seeds {values_in(records, 'seed')}.",
        "",
        "| variant | head dim | heads | state bytes (one layer) | pairs | lr | accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for (variant, head_dim, pairs), rs in sorted(
        best.items(), key=lambda item: (item[0][2], item[1][0]["state_bytes"])
    ):
        accuracies = ", ".join(f"{r['accuracy']:.1%}" for r in rs)
        lines.append(
            f"| {variant} | {head_dim} | {rs[0].get('heads', HEADS)} | {rs[0]['state_bytes']:,} | {pairs} "
            f"| {rs[0]['lr']:g} | {accuracies} |"
        )
    return save_table(args.out, lines)


def plot(args, best: dict) -> None:
    all_pairs = sorted({n for _, _, n in best})
    figure, panels = plt.subplots(1, len(all_pairs), figsize=(6 * len(all_pairs), 4.5), squeeze=False)
    for panel, pairs in zip(panels[0], all_pairs):
        for variant in variants_in(best):
            points = sorted(
                (rs[0]["state_bytes"], np.mean([r["accuracy"] for r in rs]), head_dim)
                for (v, head_dim, n), rs in best.items()
                if v == variant and n == pairs
            )
            if not points:
                continue
            x, y, dims = zip(*points)
            (line,) = panel.plot(x, y, marker="o", label=variant)
            dims_at = {}  # head dims at one point (softmax's cache at a fixed width) share one label
            for xi, yi, dim in points:
                dims_at.setdefault((xi, round(yi, 2)), []).append(str(dim))
            for (xi, yi), dims in dims_at.items():
                panel.annotate(f"d={', '.join(dims)}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
            # Each seed too: a mean of 10% and 95% is no run's result.
            seeds = [
                (r["state_bytes"], r["accuracy"])
                for (v, _, n), rs in best.items()
                if v == variant and n == pairs
                for r in rs
            ]
            panel.scatter(*zip(*seeds), marker="x", color=line.get_color(), alpha=0.6, s=20)
        panel.set(xscale="log", xlabel="state bytes, one layer (softmax: its key/value cache)", ylabel="accuracy")
        panel.set(ylim=(0, 1.02), title=f"MQAR, {pairs} pairs, context {context(args, pairs)} (o: mean, x: a seed)")
    panels[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out / "accuracy_by_state.png", dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    args = parse_args(argv)
    hold_settings(args.out, args, SETTINGS)
    grid = [
        (v, d, n, lr, s)
        for v in args.variants
        for d in args.head_dims
        for n in args.pairs
        for lr in args.lrs
        for s in args.seeds
    ]
    measure = lambda *point: train_and_evaluate_point(args, *point)  # noqa: E731
    records = run_grid(
        grid, ("variant", "head_dim", "pairs", "lr", "seed"), args.steps, measure, run_name, args.out, "MQAR runs"
    )
    best = best_per_point(records, ("variant", "head_dim", "pairs"), "accuracy")
    print(write_table(args, records, best))
    plot(args, best)


if __name__ == "__main__":
    main()
