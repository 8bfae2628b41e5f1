"""Fig. 1 and Fig. 2 of the paper in miniature: recall accuracy against the training context, and
by position on sequences of 4x the training context.

    python experiments/recall_context.py                  # the quick grid: 6 runs, 14 minutes on 2 cores
    python experiments/recall_context.py --grid full      # docs/experiments.md's grid: 18 runs, up to 15 minutes each
    python experiments/recall_context.py --grid full --seeds 0 1 --lrs 1e-3 3e-3 1e-2 --out experiments/more

Each (variant, training context, learning rate, seed) is one `train.py` run in OUT/runs/NAME,
then one `eval.py` of it at 4x its context on fresh heldout sequences (their first quarter is the
training context's distribution). Running the command again skips finished runs, resumes an
interrupted one, and continues every run to a larger --steps. Writes OUT/results.json (one
record per run), OUT/table.md (the best learning rate per point, as Zoology reports, with every
seed), accuracy_by_context.png and accuracy_by_position.png.
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

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

# The pilot's setting (../shared notes, docs/experiments.md): 8 pairs an episode, each episode's
# keys drawn afresh from 32, so old pairs go stale; 16 values.
TASK = "recall-stream:pairs=8,keys=32,values=16,fresh=0"


# quick: Fig. 1 (ungated p = 2 falls from 64 to 256 where softmax holds), Fig. 2 (it falls past
# its context) and the gate's fix, in gated p = 4, the one gated variant that learned the task in
# every run of the full grid (gated p = 2 at gamma 0.999 learns late, and when depends on the seed).
GRIDS = dict(
    quick=dict(
        out=ROOT / "experiments" / "quick" / "recall_context",
        variants=["softmax", "sympow p=2", "sympow_gated p=4"],
        contexts=[64, 256],
    ),
    full=dict(out=ROOT / "experiments" / "recall_context", variants=list(VARIANTS), contexts=[64, 256, 1024]),
)

# What sets every run of a folder besides its grid's axes (runs.hold_settings).
SETTINGS = ("task", "tokens_per_update", "gate_init", "eval_sequences")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_option(parser, GRIDS)
    parser.add_argument("--out", type=Path, help="default: the grid's folder")
    parser.add_argument("--task", default=TASK)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="default: the grid's")
    parser.add_argument("--contexts", nargs="+", type=int, help="default: the grid's")
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--tokens-per-update", type=int, default=8192)
    parser.add_argument("--gate-init", type=float, help="the gated variants' initial gamma (default: the model's)")
    parser.add_argument("--eval-sequences", type=int, default=64, help="heldout sequences of 4x the context")
    return fill_from_grid(parser.parse_args(argv), GRIDS)


def run_name(variant: str, context: int, lr: float, seed: int) -> str:
    return f"{slug(variant)}-T{context}-lr{lr:g}-seed{seed}"


def train_and_evaluate_point(args, variant: str, context: int, lr: float, seed: int) -> dict:
    """One point of the grid: its train.py run and its evaluation at 4x."""
    train = ["--preset", "recall", "--data", args.task, *variant_flags(variant), "--context", str(context)]
    train += ["--lr", str(lr), "--seed", str(seed), "--tokens-per-update", str(args.tokens_per_update)]
    train += [] if args.gate_init is None else ["--gate-init", str(args.gate_init)]
    train += ["--warmup", "20", "--log-every", "50", "--checkpoint-every", "250"]
    evaluate = ["--context", str(4 * context), "--windows", str(args.eval_sequences), "--bins", "16"]
    name = run_name(variant, context, lr, seed)
    result, metrics = train_and_evaluate(args.out, name, train, evaluate, args.steps)
    quarters = [accuracy(result, q * context, (q + 1) * context) for q in range(4)]
    return dict(
        variant=variant,
        context=context,
        lr=lr,
        seed=seed,
        steps=args.steps,
        train_accuracy=[(r["step"], r["accuracy"]) for r in metrics if "accuracy" in r],
        accuracy_1x=quarters[0],
        accuracy_4x=accuracy(result, 0, 4 * context),
        accuracy_by_quarter_at_4x=quarters,
        accuracy_by_position_at_4x=result["accuracy_by_position"],
        targets_by_position_at_4x=result["targets_by_position"],
    )


def write_table(args, records: list[dict], best: dict) -> str:
    lines = [
        f"Task `{args.task}`, recall preset, {args.steps} steps of {args.tokens_per_update} tokens, "
        + ("" if args.gate_init is None else f"gate init {args.gate_init}, ")
        + f"learning rates {values_in(records, 'lr')} (best per point shown), seeds {values_in(records, 'seed')}.",
        "",
        "| variant | training context | lr | accuracy at 1x | at 4x | at 4x, quarters 1..4 |",
        "|---|---|---|---|---|---|",
    ]
    for variant in variants_in(best):
        for context in sorted(c for v, c in best if v == variant):
            rs = best[variant, context]
            one, four = (", ".join(f"{r[k]:.1%}" for r in rs) for k in ("accuracy_1x", "accuracy_4x"))
            quarters = ", ".join(f"{q:.1%}" for q in np.mean([r["accuracy_by_quarter_at_4x"] for r in rs], axis=0))
            lines.append(f"| {variant} | {context} | {rs[0]['lr']:g} | {one} | {four} | {quarters} |")
    return save_table(args.out, lines)


def plot(args, best: dict) -> None:
    figure, axes = plt.subplots(figsize=(7, 5))
    for variant in variants_in(best):
        points = sorted((c, np.mean([r["accuracy_1x"] for r in rs])) for (v, c), rs in best.items() if v == variant)
        (line,) = axes.plot(*zip(*points), marker="o", label=variant)
        # Each seed too: where seeds split (one learns, one does not), the mean alone would hide it.
        seeds = [(c, r["accuracy_1x"]) for (v, c), rs in best.items() if v == variant for r in rs]
        axes.scatter(*zip(*seeds), marker="x", color=line.get_color(), alpha=0.6)
    axes.set(xscale="log", xlabel="training context", ylabel="recall accuracy at the training context", ylim=(0, 1))
    axes.set_title("Accuracy against training context (best lr per point; line: mean, x: each seed)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.out / "accuracy_by_context.png", dpi=120)
    plt.close(figure)

    contexts = sorted({c for _, c in best})
    figure, panels = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for panel, context in zip(panels[0], contexts):
        for variant in variants_in(best):
            if (rs := best.get((variant, context))) is None:
                continue
            counts = np.asarray(rs[0]["targets_by_position_at_4x"], float)
            right = np.mean([np.nan_to_num(np.array(r["accuracy_by_position_at_4x"], float)) for r in rs], axis=0)
            edges = np.linspace(0, len(counts), 17).astype(int)
            bins = list(zip(edges[:-1], edges[1:]))
            means = [
                (right[a:b] * counts[a:b]).sum() / counts[a:b].sum() if counts[a:b].sum() else np.nan for a, b in bins
            ]
            answered = ~np.isnan(means)  # bins holding only pairs have nothing to answer
            panel.plot(edges[1:][answered], np.asarray(means)[answered], marker=".", label=variant)
        panel.axvline(context, color="grey", linestyle=":")
        panel.set(title=f"trained at {context}", xlabel="position (bin end)", ylabel="accuracy", ylim=(0, 1))
    panels[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.out / "accuracy_by_position.png", dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    args = parse_args(argv)
    hold_settings(args.out, args, SETTINGS)
    grid = [(v, c, lr, s) for v in args.variants for c in args.contexts for lr in args.lrs for s in args.seeds]
    measure = lambda *point: train_and_evaluate_point(args, *point)  # noqa: E731
    records = run_grid(
        grid, ("variant", "context", "lr", "seed"), args.steps, measure, run_name, args.out, "recall runs"
    )
    best = best_per_point(records, ("variant", "context"), "accuracy_1x")
    print(write_table(args, records, best))
    plot(args, best)


if __name__ == "__main__":
    main()
