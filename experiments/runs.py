"""What the experiments share: the variants, and one point of a grid as a train.py run followed
by an eval.py of it, each in its own folder under OUT, skipped when already done and resumed or
continued (to a larger --steps) otherwise."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (attention, p)
    "softmax": ("softmax", 2),
    "sympow p=2": ("sympow", 2),
    "sympow_gated p=2": ("sympow_gated", 2),
    "conformal p=2": ("conformal", 2),
    "sympow p=4": ("sympow", 4),
    "sympow_gated p=4": ("sympow_gated", 4),
}


def add_grid_option(parser, grids: dict[str, dict]) -> None:
    """--grid: which named grid fills the options left unset. Every experiment has a `quick` grid
    (the default: the three experiments' quick grids together take under an hour on 2 cores,
    written under experiments/quick/) and a `full` one (the grids docs/experiments.md reports,
    in the experiment's own folder)."""
    described = "; ".join(f"{name}: {describe(grid)}" for name, grid in grids.items())
    parser.add_argument("--grid", choices=list(grids), default="quick", help=f"options left unset ({described})")


def describe(grid: dict) -> str:
    """The grid as the command-line options that give it, e.g. `--contexts 64 256`."""
    word = lambda value: shlex.quote(str(value.relative_to(ROOT) if isinstance(value, Path) else value))  # noqa: E731
    words = lambda value: " ".join(map(word, value if isinstance(value, list) else [value]))  # noqa: E731
    return " ".join(f"{flag(name)} {words(value)}" for name, value in grid.items() if value is not None)


def flag(name: str) -> str:
    """The command-line option of an argparse destination, e.g. `--tokens-per-update`."""
    return "--" + name.replace("_", "-")


def fill_from_grid(args, grids: dict[str, dict]):
    """ARGS with every option still None taken from the chosen --grid."""
    for name, value in grids[args.grid].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def variant_flags(variant: str) -> list[str]:
    attention, p = VARIANTS[variant]
    return ["--attention", attention, "--p", str(p)]


def slug(variant: str) -> str:
    return variant.replace(" ", "_").replace("=", "")


def evaluated_step(evaluation: Path) -> int | None:
    """The training step of the checkpoint an earlier evaluation measured (None: not evaluated)."""
    results = evaluation / "results.json"
    return json.loads(results.read_text())[0]["step"] if results.exists() else None


def train_and_evaluate(out: Path, name: str, train: list[str], evaluate: list[str], steps: int) -> tuple[dict, list]:
    """Run `train.py TRAIN --steps STEPS` into OUT/runs/NAME and `eval.py` of it with EVALUATE into
    OUT/eval/NAME, unless that evaluation already measured step STEPS. The learning rate is
    constant after warmup, so a run continued from 1000 steps to 2000 equals a 2000-step run.
    Returns eval's result and the run's metrics records."""
    run, evaluation = out / "runs" / name, out / "eval" / name
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    if evaluated_step(evaluation) != steps:
        commands = [
            ["train.py", *train, "--steps", str(steps), "--out", str(run)],
            ["eval.py", str(run), *evaluate, "--out", str(evaluation)],
        ]
        for script, *flags in commands:
            command = [sys.executable, str(ROOT / script), *flags]
            subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if (reached := evaluated_step(evaluation)) != steps:  # a run already past --steps is not cut back
            sys.exit(
                f"{run} is at step {reached}, past --steps {steps}: ask for {reached} or more, or use another --out"
            )
    (result,) = json.loads((evaluation / "results.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return result, metrics


def hold_settings(out: Path, args, names: tuple[str, ...]) -> None:
    """Stop, before anything runs, if OUT's records were made with other settings than ARGS's
    NAMES (the options outside the grid's axes and --steps: the task, the width, the tokens an
    update...). They are written to OUT/settings.json and bind from the folder's first record
    on; until then a command's own replace them. A point's record is found by its axes alone,
    so without this a second setup would reuse the first's records under its own table heading,
    or stop mid-grid when train.py refuses to resume a run of another shape."""
    # Through JSON, so that what is compared is what the file holds (a tuple is a list there).
    settings = json.loads(json.dumps({name: getattr(args, name) for name in names}, default=str))
    saved_file = out / "settings.json"
    if not (out / "results.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        saved_file.write_text(json.dumps(settings, indent=1) + "\n")
        return
    if not saved_file.exists():
        sys.exit(
            f"{out} holds records but no settings.json (made before folders kept their settings): write there"
            f" the settings its runs were made with (this command's: {json.dumps(settings)}), or use another --out"
        )
    try:
        saved = json.loads(saved_file.read_text())
    except json.JSONDecodeError as error:
        sys.exit(f"{saved_file} is not JSON ({error}): mend it, or use another --out")
    if differing := [name for name in names if name not in saved or saved[name] != settings[name]]:
        told = ", ".join(f"{flag(n)} {shown(settings, n)} (the folder's: {shown(saved, n)})" for n in differing)
        sys.exit(f"{out} holds runs made with other settings: {told}; give the folder's, or another --out")


def shown(settings: dict, name: str) -> str:
    """One setting as an error message names it."""
    if name not in settings:
        return "not recorded"
    return "unset" if settings[name] is None else str(settings[name])


def run_grid(
    points: list, fields: tuple[str, ...], steps: int, measure, names, out: Path, description: str
) -> list[dict]:
    """measure(*point) for every point, with a progress bar, writing OUT/results.json after each;
    a failed run stops the grid with its name and the end of its stderr. A point whose record
    (its `fields`) at `steps` is already in OUT/results.json is not run again, so a fresh clone
    (which has the results but not the ignored runs/) resumes where the committed grid stopped;
    the file keeps the records of points outside this grid, and a point's record at other steps
    gives way to the new one. Returns the folder's records at `steps`, this grid's and those
    earlier grids left in OUT, so that OUT's table and plots show every run it holds at that
    budget (a seed or a variant added later joins them rather than replacing them)."""
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    previous = json.loads(saved.read_text()) if saved.exists() else []
    point_of = lambda record: tuple(record[f] for f in fields)  # noqa: E731
    done = {point_of(r): r for r in previous if r["steps"] == steps}
    records = []
    bar = tqdm(points, desc=description, unit="run")
    for point in bar:
        bar.set_postfix_str(names(*point))  # a run takes minutes: say which one is going
        try:
            records.append(done.get(tuple(point)) or measure(*point))
        except subprocess.CalledProcessError as error:
            sys.exit(f"{names(*point)} failed:\n{error.stderr.decode(errors='replace')[-3000:]}")
        ours = {point_of(r) for r in records}  # a point run to other steps is replaced
        # Under another name, then renamed: a kill mid-write leaves the last whole file, which a rerun resumes from.
        partial = saved.with_name(saved.name + ".partial")
        partial.write_text(json.dumps(records + [r for r in previous if point_of(r) not in ours]))
        partial.replace(saved)
    ours = {point_of(r) for r in records}
    return records + [r for r in previous if r["steps"] == steps and point_of(r) not in ours]


def best_per_point(records: list[dict], point: tuple[str, ...], figure: str, best=max) -> dict:
    """{the point's fields' values: the records of the learning rate whose mean `figure` is best}
    (`max` for an accuracy, `min` for a loss): the best learning rate per point, as Zoology reports.
    Each point's records come in the order of their seeds, as the tables list them."""
    by_point = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        by_point.setdefault(tuple(r[f] for f in point), {}).setdefault(r["lr"], []).append(r)
    return {
        key: best(by_lr.values(), key=lambda rs: np.mean([r[figure] for r in rs])) for key, by_lr in by_point.items()
    }


def variants_in(best: dict) -> list[str]:
    """The variants of BEST's points (whose keys begin with the variant), in VARIANTS' order."""
    return [variant for variant in VARIANTS if any(key[0] == variant for key in best)]


def values_in(records: list[dict], field: str) -> list:
    """The distinct values of one field over the records, e.g. the seeds a folder holds."""
    return sorted({record[field] for record in records})


def save_table(out: Path, lines: list[str]) -> str:
    """Write the lines as OUT/table.md and return them as one string."""
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def accuracy(result: dict, first: int, last: int) -> float:
    """The fraction of answers right at positions first+1..last of an eval result."""
    means, counts = result["accuracy_by_position"][first:last], result["targets_by_position"][first:last]
    return sum(m * n for m, n in zip(means, counts) if n) / sum(counts)


def mean_loss(result: dict, first: int, last: int) -> float:
    """The mean loss at positions first+1..last of an eval result (every position counts for text)."""
    losses, counts = result["loss_by_position"][first:last], result["targets_by_position"][first:last]
    return sum(m * n for m, n in zip(losses, counts) if n) / sum(counts)
