"""The paper's context scaling (Fig. 1) on bytes: heldout loss against the training context, at a
fixed number of tokens per update (the paper's batching: longer contexts, fewer sequences).

    python experiments/bytes_context.py                       # the quick grid: 6 runs, 11 minutes on 2 cores
    python experiments/bytes_context.py --grid full           # docs/experiments.md's grid: 9 runs, 3 to 10 minutes each
    python experiments/bytes_context.py --grid full --seeds 0 1 --steps 1000 --out experiments/bytes_more

The data is the embedded corpus (the standard library's sources) as bytes, vocabulary 256, so a
tiny model spends its time in its layers, not in a 50257-way softmax. Each (variant, training
context, learning rate, seed) is one `train.py` run in OUT/runs/NAME and one `eval.py` of it at
its training context on heldout windows. The paper plots the loss late in the context, where a
finite state has had to hold the most: here, the mean loss over the last eighth of the
positions (and, beside it, over all of them). Rerunning skips finished runs, resumes interrupted
ones and continues every run to a larger --steps. Writes OUT/results.json, OUT/table.md (the best
learning rate per point) and loss_by_context.png.
"""

import argparse
from pathlib import Path

import matplotlib
import numpy as np
from runs import (
    ROOT,
    VARIANTS,
    add_grid_option,
    best_per_point,
    fill_from_grid,
    hold_settings,
    mean_loss,
    run_grid,
    save_table,
    slug,
    train_and_evaluate,
    values_in,
    variant_flags,
    variants_in,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

# quick: the three variants at two contexts, early in training (where every variant's loss rises
# with the context: the budget, not the state, docs/experiments.md).
GRIDS = dict(
    quick=dict(out=ROOT / "experiments" / "quick" / "bytes_context", contexts=[256, 1024], steps=200),
    full=dict(out=ROOT / "experiments" / "bytes_context", contexts=[256, 1024, 4096], steps=300),
)

# What sets every run of a folder besides its grid's axes (runs.hold_settings).
SETTINGS = ("preset", "tokens_per_update", "eval_windows")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_option(parser, GRIDS)
    parser.add_argument("--out", type=Path, help="default: the grid's folder")
    parser.add_argument("--preset", default="bytes", help="train.py's model preset (bytes: 2 layers, 4 heads of 16)")
    parser.add_argument("--variants", nargs="+", default=["softmax", "sympow p=2", "sympow_gated p=2"])
    parser.add_argument("--contexts", nargs="+", type=int, help="default: the grid's")
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, help="default: the grid's")
    parser.add_argument("--tokens-per-update", type=int, default=8192)
    parser.add_argument("--eval-windows", type=int, default=32, help="heldout windows per evaluation")
    args = fill_from_grid(parser.parse_args(argv), GRIDS)
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    if too_long := [c for c in args.contexts if c > args.tokens_per_update]:
        parser.error(f"contexts {too_long} are longer than --tokens-per-update {args.tokens_per_update}")
    return args


def run_name(variant: str, context: int, lr: float, seed: int) -> str:
    return f"{slug(variant)}-T{context}-lr{lr:g}-seed{seed}"


def train_and_evaluate_point(args, variant: str, context: int, lr: float, seed: int) -> dict:
    train = ["--preset", args.preset, "--data", "embedded-bytes", *variant_flags(variant), "--context", str(context)]
    train += ["--lr", str(lr), "--seed", str(seed), "--tokens-per-update", str(args.tokens_per_update)]
    train += ["--warmup", "20", "--log-every", "25", "--checkpoint-every", "100"]
    evaluate = ["--context", str(context), "--windows", str(args.eval_windows), "--bins", "16"]
    result, metrics = train_and_evaluate(args.out, run_name(variant, context, lr, seed), train, evaluate, args.steps)
    return dict(
        variant=variant,
        context=context,
        lr=lr,
        seed=seed,
        steps=args.steps,
        train_loss=[(r["step"], r["loss"]) for r in metrics if "loss" in r],
        loss_last_eighth=mean_loss(result, context - context // 8, context),
        loss=mean_loss(result, 0, context),
        loss_by_position=result["loss_by_position"],
    )


def write_table(args, records: list[dict], best: dict) -> str:
    lines = [
        f"`--data embedded-bytes`, preset {args.preset}, {args.steps} steps of {args.tokens_per_update} tokens, "
        f"learning rates {values_in(records, 'lr')} (best per point shown), seeds {values_in(records, 'seed')}; "
        "heldout loss in nats per byte.",
        "",
        "| variant | training context | lr | loss, last eighth of the context | loss, whole context |",
        "|---|---|---|---|---|",
    ]
    for variant in variants_in(best):
        for context in sorted(c for v, c in best if v == variant):
            rs = best[variant, context]
            late, whole = (", ".join(f"{r[k]:.3f}" for r in rs) for k in ("loss_last_eighth", "loss"))
            lines.append(f"| {variant} | {context} | {rs[0]['lr']:g} | {late} | {whole} |")
    return save_table(args.out, lines)


def plot(args, best: dict) -> None:
    figure, axes = plt.subplots(figsize=(7, 5))
    for variant in variants_in(best):
        points = sorted(
            (c, np.mean([r["loss_last_eighth"] for r in rs])) for (v, c), rs in best.items() if v == variant
        )
        (line,) = axes.plot(*zip(*points), marker="o", label=variant)
        # Each seed too: two variants a few hundredths apart are only told apart against the seeds' spread.
        seeds = [(c, r["loss_last_eighth"]) for (v, c), rs in best.items() if v == variant for r in rs]
        axes.scatter(*zip(*seeds), marker="x", color=line.get_color(), alpha=0.6)
    axes.set(xscale="log", xlabel="training context (bytes)", ylabel="heldout loss, last eighth of the context")
    budget = f"{args.steps} steps of {args.tokens_per_update} tokens"
    axes.set_title(f"Bytes, {budget}, best lr per point (line: mean, x: a seed)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out / "loss_by_context.png", dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    args = parse_args(argv)
    hold_settings(args.out, args, SETTINGS)
    grid = [(v, c, lr, s) for v in args.variants for c in args.contexts for lr in args.lrs for s in args.seeds]
    measure = lambda *point: train_and_evaluate_point(args, *point)  # noqa: E731
    records = run_grid(grid, ("variant", "context", "lr", "seed"), args.steps, measure, run_name, args.out, "byte runs")
    best = best_per_point(records, ("variant", "context"), "loss_last_eighth", best=min)
    print(write_table(args, records, best))
    plot(args, best)


if __name__ == "__main__":
    main()
