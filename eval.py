"""Evaluate trained runs: the loss at every position 1..N of heldout documents.

    python eval.py runs/a runs/b --context 8192 --out runs/eval

Writes results.json (per-position mean loss of every run, accumulated in float64),
loss_by_position.csv (binned), loss_by_position.png (one curve per run, each run's training
context marked), training_loss.png (the runs' logged training losses) and, when the runs
were trained at several contexts,
loss_by_training_context.png (mean loss over 1..N against training context, one line per variant).

On several processes (the flags of sympow/distributed.py, as train.py) each process evaluates
its share of every batch of windows and process 0 sums them and writes the results.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm import tqdm

from sympow import checkpoint, cli, data, distributed, run_folder

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run folders (their latest checkpoint) or checkpoint folders"
    )
    parser.add_argument(
        "--context", type=cli.positive(int), required=True, help="evaluate positions 1..N of each document"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--windows",
        type=cli.positive(int),
        default=16,
        help="heldout windows of N tokens to average over, taken column by column "
        "(every document's first window, then every second one, ...)",
    )
    parser.add_argument(
        "--batch-size",
        type=cli.positive(int),
        default=None,
        help="windows per forward pass, of all processes together (default: one per process)",
    )
    parser.add_argument("--bins", type=cli.positive(int), default=64, help="position bins in the CSV and the plot")
    parser.add_argument("--data", default=None, help="token store (default: the one each run trained on)")
    distributed.add_flags(parser)
    args = parser.parse_args(argv)
    distributed.check_flags(parser, args)
    for run in args.runs:
        if not run.is_dir():
            parser.refuse(f"run {run} is not a folder")
    if args.out.exists() and not args.out.is_dir():
        parser.refuse(f"--out {args.out} is a file, not a folder")
    return args


@eqx.filter_jit
def position_losses(model, inputs, targets) -> tuple[jax.Array, jax.Array]:
    """Next-token loss and whether the argmax is the target, at every position, [batch, seq] each."""
    logits = model(inputs).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets), jnp.argmax(logits, -1) == targets


def evaluate(model, stream, windows: int) -> np.ndarray:
    """[3, context]: at each position the summed loss, the number of targets predicted and the
    number of targets, over `windows` windows and the targets their masks count (every one for
    text, the answers of a recall task), summed in float64 over every process's share."""
    totals = np.zeros((3, stream.context), np.float64)
    batches = -(-windows // stream.batch_size)
    for _ in tqdm(range(batches), desc="eval", leave=False, disable=not distributed.is_main()):
        inputs, targets, mask = stream.next_batch()
        losses, correct = position_losses(model, jnp.asarray(inputs), jnp.asarray(targets))
        counted = np.stack([np.asarray(losses, np.float64), np.asarray(correct, np.float64), np.ones(mask.shape)])
        totals += np.where(mask, counted, 0.0).sum(axis=1)
    if jax.process_count() > 1:
        totals = np.sum(multihost_utils.process_allgather(totals), axis=0)
    return totals


def per_position(totals: np.ndarray, which: int) -> list:
    """Mean loss (which = 0) or accuracy (1) at each position; None where no target counts."""
    return [float(s / n) if n else None for s, n in zip(totals[which], totals[2])]


def binned(result: dict, bins: int, which: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(last position of each bin, mean loss or accuracy over the targets in it): bins of equal
    width over positions 1..N, each target weighted alike."""
    means = np.array([np.nan if m is None else m for m in result[f"{which}_by_position"]])
    counts = np.asarray(result["targets_by_position"], np.float64)
    edges = np.linspace(0, len(means), min(bins, len(means)) + 1).astype(int)
    sums, ns = np.nan_to_num(means) * counts, counts
    return edges[1:], np.array(
        [sums[a:b].sum() / ns[a:b].sum() if ns[a:b].sum() else np.nan for a, b in zip(edges[:-1], edges[1:])]
    )


def label(result: dict) -> str:
    return (
        f"{result['attention']} (p={result['p']}, trained at {result['train_context']})"
        if result["attention"] != "softmax"
        else f"softmax (trained at {result['train_context']})"
    )


def save(figure, axes, path: Path) -> None:
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_by_position(results: list[dict], bins: int, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(8, 5))
    for result in results:
        ends, means = binned(result, bins)
        (line,) = axes.plot(ends, means, label=label(result))
        axes.axvline(result["train_context"], color=line.get_color(), linestyle=":", alpha=0.7)
    axes.set(
        xlabel="position in document (bin end)",
        ylabel="mean next-token loss (nats)",
        title="Loss by position (dotted: training context)",
    )
    save(figure, axes, path)


def plot_by_training_context(results: list[dict], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 5))
    for attention in dict.fromkeys(r["attention"] for r in results):
        points = sorted((r["train_context"], r["mean_loss"]) for r in results if r["attention"] == attention)
        axes.plot(*zip(*points), marker="o", label=attention)
    axes.set(
        xscale="log",
        xlabel="training context",
        ylabel=f"mean loss over positions 1..{results[0]['eval_context']}",
        title="Final loss against training context",
    )
    save(figure, axes, path)


def plot_training_curves(results: list[dict], path: Path) -> None:
    """Each run's logged training loss (metrics.jsonl) against tokens seen."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for result in results:
        records = [r for r in run_folder.read_metrics(Path(result["run"]) / "metrics.jsonl") if "loss" in r]
        if records:
            axes.plot([r["tokens"] for r in records], [r["loss"] for r in records], label=label(result))
    axes.set(xlabel="training tokens", ylabel="training loss (nats)", yscale="log", title="Training loss")
    save(figure, axes, path)


def write_csv(results: list[dict], bins: int, path: Path) -> None:
    columns = [binned(r, bins) for r in results]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["bin_end_position"] + [str(r["run"]) for r in results])
        for i, end in enumerate(columns[0][0]):
            writer.writerow([int(end)] + [f"{means[i]:.6f}" for _, means in columns])


def main(argv=None) -> None:
    args = parse_args(argv)
    distributed.initialize(args)
    batch_size = args.batch_size or jax.process_count()
    if batch_size % jax.process_count():
        cli.refuse(f"--batch-size {batch_size} must be a multiple of the {jax.process_count()} processes")
    try:
        results = [evaluate_run(args, run, batch_size) for run in args.runs]
    except (FileNotFoundError, checkpoint.DamagedCheckpoint, data.CorruptData) as error:
        sys.exit(f"eval.py: {error}")
    if distributed.is_main():
        args.out.mkdir(parents=True, exist_ok=True)
        write_results(args, results)


def evaluate_run(args, run: Path, batch_size: int) -> dict:
    """The loss and accuracy at each position of a run's newest complete checkpoint, and what it
    was trained as."""
    model, meta = checkpoint.load_model(run)
    process = (jax.process_index(), jax.process_count())
    spec = args.data or meta["args"]["data"]
    try:
        stream = data.open_stream(
            spec, "heldout", args.context, batch_size, 0, *process, vocab_size=model.config.vocab_size
        )
    except data.CorruptData:
        raise
    except ValueError as error:
        cli.refuse(f"--context {args.context}: {error}")
    windows = -(-min(args.windows, stream.examples) // batch_size) * batch_size  # whole batches
    totals = evaluate(model, stream, windows)
    if not np.all(np.isfinite(totals)):
        raise data.CorruptData(f"{run}: the loss is not finite at {np.sum(~np.isfinite(totals[0]))} positions")
    targets = totals[2].sum()
    result = dict(
        run=str(run),
        attention=meta["config"]["attention"],
        p=meta["config"]["p"],
        step=meta["step"],
        train_context=int(meta["args"]["context"]),
        eval_context=args.context,
        windows=windows,
        mean_loss=float(totals[0].sum() / targets),
        mean_accuracy=float(totals[1].sum() / targets),
        loss_by_position=per_position(totals, 0),
        accuracy_by_position=per_position(totals, 1),
        targets_by_position=totals[2].astype(int).tolist(),
    )
    if distributed.is_main():
        print(
            f"{run}: mean loss {result['mean_loss']:.4f}, accuracy {result['mean_accuracy']:.2%} over positions "
            f"1..{args.context} ({windows} windows)"
        )
    return result


def mean_over(result: dict, first: int, last: int, which: str = "loss") -> float | None:
    """Mean loss or accuracy over the targets at positions first+1..last."""
    means = result[f"{which}_by_position"][first:last]
    counts = result["targets_by_position"][first:last]
    total = sum(n for n in counts)
    return sum(m * n for m, n in zip(means, counts) if n) / total if total else None


def write_results(args, results: list[dict]) -> None:
    """results.json, the CSV and the plots, and a table on stdout."""
    (args.out / "results.json").write_text(json.dumps(results))
    write_csv(results, args.bins, args.out / "loss_by_position.csv")
    plot_by_position(results, args.bins, args.out / "loss_by_position.png")
    plot_training_curves(results, args.out / "training_loss.png")
    if len({r["train_context"] for r in results}) > 1:
        plot_by_training_context(results, args.out / "loss_by_training_context.png")
    print(
        "\n| run | attention | trained at | loss within training context | loss past it "
        f"| mean over 1..{args.context} | accuracy |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        trained = r["train_context"]
        within, beyond = mean_over(r, 0, trained), mean_over(r, trained, args.context)
        show = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
        print(
            f"| {r['run']} | {r['attention']} | {trained} | {show(within)} | {show(beyond)}"
            f" | {r['mean_loss']:.4f} | {r['mean_accuracy']:.2%} |"
        )


if __name__ == "__main__":
    main()
