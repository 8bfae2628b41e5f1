"""The experiments' commands (experiments/): the figures they compute from eval results, the
state sizes they plot, and a grid that is skipped when done and continued to more steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import sympow
from sympow import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))  # the experiments import their shared module as `runs`

import bytes_context  # noqa: E402
import gate_memory  # noqa: E402
import recall_context  # noqa: E402
import recall_state  # noqa: E402
import runs  # noqa: E402


def test_state_bytes_of_each_variant():
    # S [D, dim] and z [D] per head, 4 heads, float32; D = C(dim + p - 1, p): 136 at (16, 2), 3876 at (16, 4).
    assert recall_state.state_bytes("sympow p=2", 16, 128) == 4 * 136 * 17 * 4
    assert recall_state.state_bytes("sympow_gated p=2", 8, 128) == 4 * 36 * 9 * 4
    assert recall_state.state_bytes("sympow p=4", 16, 128) == 4 * 3876 * 17 * 4
    assert recall_state.state_bytes("softmax", 16, 128) == 2 * 128 * 64 * 4  # keys and values at the context
    assert recall_state.state_bytes("sympow p=2", 8, 128, heads=8) == 8 * 36 * 9 * 4  # --d-model 64, head dim 8


def test_a_fixed_width_gives_width_over_head_dim_heads():
    args = recall_state.parse_args(["--d-model", "64", "--head-dims", "16", "8", "4"])
    assert [recall_state.heads(args, d) for d in args.head_dims] == [4, 8, 16]
    assert recall_state.heads(recall_state.parse_args(["--grid", "full"]), 8) == 4  # 4 heads, d_model 4 x dim
    with pytest.raises(SystemExit):
        recall_state.parse_args(["--d-model", "64", "--head-dims", "24"])


@pytest.mark.parametrize("experiment", [recall_context, recall_state, bytes_context], ids=lambda e: e.__name__)
def test_the_quick_grid_is_the_default_and_writes_apart_from_the_full_one(experiment):
    quick, full = experiment.parse_args([]), experiment.parse_args(["--grid", "full"])
    assert quick.out == ROOT / "experiments" / "quick" / experiment.__name__
    assert full.out == ROOT / "experiments" / experiment.__name__  # the folder docs/experiments.md reports
    for name, value in experiment.GRIDS["full"].items():
        assert getattr(full, name) == value
    chosen = experiment.parse_args(["--grid", "full", "--out", "elsewhere", "--seeds", "3"])
    assert chosen.out == Path("elsewhere") and chosen.seeds == [3]  # an option given is kept


def test_the_grids_read_as_the_options_that_give_them():
    grid = dict(out=ROOT / "a" / "b", variants=["softmax", "sympow p=2"], head_dims=[8, 16], d_model=None, steps=9)
    assert runs.describe(grid) == "--out a/b --variants softmax 'sympow p=2' --head-dims 8 16 --steps 9"


def test_accuracy_and_loss_over_a_span_weigh_positions_by_their_targets():
    result = dict(
        accuracy_by_position=[None, 0.5, 1.0, 0.0],
        targets_by_position=[0, 2, 1, 3],
        loss_by_position=[9.0, 1.0, 2.0, 3.0],
    )
    assert runs.accuracy(result, 0, 4) == pytest.approx((1 + 1) / 6)
    assert runs.accuracy(result, 1, 3) == pytest.approx(2 / 3)
    assert runs.mean_loss(result, 1, 4) == pytest.approx((2 * 1 + 2 + 3 * 3) / 6)


def test_a_grid_is_skipped_when_done_and_continued_to_more_steps(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, str(ROOT / "experiments" / "bytes_context.py"), "--out", str(tmp_path)]
    command += [
        "--variants",
        "sympow_gated p=2",
        "--contexts",
        "32",
        "--tokens-per-update",
        "64",
        "--eval-windows",
        "2",
    ]
    name = "sympow_gated_p2-T32-lr0.003-seed0"
    evaluation = tmp_path / "eval" / name / "results.json"

    def run(steps, status=0):
        done = subprocess.run([*command, "--steps", str(steps)], capture_output=True, text=True, env=env, cwd=ROOT)
        assert done.returncode == status, done.stderr
        return done.stdout + done.stderr

    assert "| sympow_gated p=2 | 32 |" in run(2)
    measured = evaluation.stat().st_mtime_ns
    run(2)
    assert evaluation.stat().st_mtime_ns == measured  # nothing to do: not trained or evaluated again
    run(3)
    assert json.loads(evaluation.read_text())[0]["step"] == 3
    metrics = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if "loss" in r][-1] == 3
    (record,) = json.loads((tmp_path / "results.json").read_text())
    assert record["steps"] == 3 and record["loss_last_eighth"] > 0
    assert (tmp_path / "table.md").exists() and (tmp_path / "loss_by_context.png").exists()
    assert "is at step 3, past --steps 2" in run(2, status=1)  # a finished run is not relabelled


def test_gate_memory_reads_an_untrained_gate_as_its_initial_gamma(tmp_path):
    task = "recall-stream:pairs=2,keys=8,values=4,fresh=0"
    config = sympow.ModelConfig(
        vocab_size=13, d_model=16, n_layers=2, n_heads=2, attention="sympow_gated", gate_init=0.9
    )
    checkpoint.save(
        tmp_path / "run", 1, sympow.Transformer(config, key=jax.random.key(0)), None, 0, dict(data=task, context=32)
    )
    result = gate_memory.gate_memory(tmp_path / "run", period=8, sequences=4)
    assert len(result["layers"]) == 2
    for layer in result["layers"]:  # the gate's weights start small: every gamma is near 0.9
        np.testing.assert_allclose(layer["mean_gamma"], 0.9, atol=2e-3)
        np.testing.assert_allclose(layer["memory_tokens"], 10, rtol=0.03)
        np.testing.assert_allclose(layer["kept_over_period"], 0.9**8, rtol=0.02)
        assert np.shape(layer["gamma_by_offset"]) == (2, 8)
    ungated = sympow.Transformer(
        sympow.ModelConfig(**{**config.__dict__, "attention": "sympow"}), key=jax.random.key(0)
    )
    checkpoint.save(tmp_path / "ungated", 1, ungated, None, 0, dict(data=task, context=32))
    with pytest.raises(SystemExit, match="a sympow model has no gate"):
        gate_memory.gate_memory(tmp_path / "ungated", period=8, sequences=4)
    with pytest.raises(SystemExit, match="--period 64 must be in 1..32"):
        gate_memory.gate_memory(tmp_path / "run", period=64, sequences=4)
    with pytest.raises(SystemExit, match="does not exist"):
        gate_memory.gate_memory(tmp_path / "nothing", period=8, sequences=4)


def test_best_per_point_takes_the_learning_rate_with_the_best_mean_over_seeds():
    records = [
        dict(variant="a", context=64, lr=1e-3, seed=0, loss=1.0),
        dict(variant="a", context=64, lr=1e-3, seed=1, loss=3.0),  # mean 2.0
        dict(variant="a", context=64, lr=3e-3, seed=0, loss=1.5),
        dict(variant="a", context=64, lr=3e-3, seed=1, loss=1.9),  # mean 1.7
        dict(variant="a", context=256, lr=1e-3, seed=0, loss=2.5),
    ]
    lowest = runs.best_per_point(records, ("variant", "context"), "loss", best=min)
    assert [r["seed"] for r in lowest[("a", 64)]] == [0, 1] and lowest[("a", 64)][0]["lr"] == 3e-3
    assert runs.best_per_point(records, ("variant", "context"), "loss")[("a", 64)][0]["lr"] == 1e-3
    assert lowest[("a", 256)][0]["loss"] == 2.5


def test_a_grid_reuses_the_committed_records_of_a_fresh_clone(tmp_path):
    """A fresh clone has results.json but no runs/: its finished points are not run again, and
    records of points outside the grid stay in the file and, at the grid's steps, in what it
    returns (the folder's table), so a seed or a variant added later does not hide the rest."""
    fields = ("variant", "seed")
    kept = [dict(variant="a", seed=0, steps=5, accuracy=0.9), dict(variant="b", seed=0, steps=5, accuracy=0.1)]
    (tmp_path / "results.json").write_text(json.dumps(kept))
    measured = []

    def measuring(steps):
        def measure(variant, seed):
            measured.append((variant, seed))
            return dict(variant=variant, seed=seed, steps=steps, accuracy=0.5)

        return measure

    records = runs.run_grid([("a", 0), ("a", 1)], fields, 5, measuring(5), lambda *p: str(p), tmp_path, "grid")
    assert measured == [("a", 1)] and [r["accuracy"] for r in records] == [0.9, 0.5, 0.1]
    assert sorted((r["variant"], r["seed"]) for r in json.loads((tmp_path / "results.json").read_text())) == [
        ("a", 0),
        ("a", 1),
        ("b", 0),
    ]
    records = runs.run_grid([("a", 0)], fields, 6, measuring(6), lambda *p: str(p), tmp_path, "grid")
    assert measured[-1] == ("a", 0) and [(r["variant"], r["steps"]) for r in records] == [("a", 6)]  # more steps
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sorted((r["variant"], r["seed"], r["steps"]) for r in saved) == [("a", 0, 6), ("a", 1, 5), ("b", 0, 5)]


def test_the_byte_table_shows_every_run_the_folder_holds(tmp_path):
    """A second seed of two points, run after the whole grid, joins its table and plot: the
    table lists each point's seeds in order and its variants in VARIANTS' order, and says which
    seeds and rates it holds."""
    args = bytes_context.parse_args(["--out", str(tmp_path), "--variants", "softmax", "--contexts", "1024"])
    record = lambda variant, context, seed, loss: dict(  # noqa: E731
        variant=variant, context=context, lr=3e-3, seed=seed, loss_last_eighth=loss, loss=loss + 0.1
    )
    records = [record("softmax", 1024, 1, 1.9)]  # this grid: seed 1 of one point
    records += [record(v, c, 0, 2.0) for v in ("sympow_gated p=2", "softmax") for c in (4096, 1024)]  # the folder's
    best = runs.best_per_point(records, ("variant", "context"), "loss_last_eighth", best=min)
    table = bytes_context.write_table(args, records, best).splitlines()
    assert "learning rates [0.003]" in table[0] and "seeds [0, 1]" in table[0]
    assert table[4:] == [
        "| softmax | 1024 | 0.003 | 2.000, 1.900 | 2.100, 2.000 |",  # seed 0, then the later grid's seed 1
        "| softmax | 4096 | 0.003 | 2.000 | 2.100 |",
        "| sympow_gated p=2 | 1024 | 0.003 | 2.000 | 2.100 |",
        "| sympow_gated p=2 | 4096 | 0.003 | 2.000 | 2.100 |",
    ]
    bytes_context.plot(args, best)
    assert (tmp_path / "loss_by_context.png").stat().st_size > 0


# Each experiment's grid axes: every other option but --grid, --out and --steps is a setting.
AXES = {
    bytes_context: {"variants", "contexts", "lrs", "seeds"},
    recall_context: {"variants", "contexts", "lrs", "seeds"},
    recall_state: {"variants", "head_dims", "pairs", "lrs", "seeds"},
}


@pytest.mark.parametrize("experiment", AXES, ids=lambda module: module.__name__)
def test_every_option_outside_the_grid_axes_is_a_kept_setting(experiment):
    options = set(vars(experiment.parse_args(["--out", "unused"])))
    assert options - {"grid", "out", "steps"} - AXES[experiment] == set(experiment.SETTINGS)


@pytest.mark.parametrize(
    "experiment, grid, setting, folders, message",
    [
        (
            bytes_context,
            ["--contexts", "32"],
            "tokens_per_update",
            64,
            r"--tokens-per-update 8192 \(the folder's: 64\)",
        ),
        (recall_context, ["--contexts", "64"], "gate_init", 0.97, r"--gate-init unset \(the folder's: 0.97\)"),
        (recall_state, ["--head-dims", "8"], "d_model", 32, r"--d-model 64 \(the folder's: 32\)"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_a_folder_made_with_other_settings_stops_before_running(tmp_path, experiment, grid, setting, folders, message):
    """Records are found by their grid's axes alone: a folder's settings are kept beside them,
    and a run with others stops, naming the option, and changes nothing, rather than showing
    the first setup's records under the second's heading. (Without the check, the one-step
    grid would run and the test fail on the missing SystemExit.)"""
    options = ["--out", str(tmp_path), "--variants", "softmax", *grid, "--steps", "1"]
    runs.hold_settings(tmp_path, experiment.parse_args(options), experiment.SETTINGS)
    saved = json.loads((tmp_path / "settings.json").read_text())
    (tmp_path / "settings.json").write_text(json.dumps({**saved, setting: folders}))
    (tmp_path / "results.json").write_text("[]")
    before = {path: path.read_text() for path in tmp_path.iterdir()}
    with pytest.raises(SystemExit, match=message):
        experiment.main(options)
    assert {path: path.read_text() for path in tmp_path.iterdir()} == before  # nothing run, nothing written


def test_a_folder_binds_its_settings_from_its_first_record(tmp_path):
    """Until a record is written a command's settings replace the folder's (a first command that
    failed early pins nothing); a folder with records and no settings.json (made before they
    were kept) stops, saying what to write; the folder's own settings pass."""
    options = ["--out", str(tmp_path), "--variants", "softmax", "--contexts", "32", "--steps", "1"]
    hold = lambda tokens: runs.hold_settings(  # noqa: E731
        tmp_path, bytes_context.parse_args([*options, "--tokens-per-update", tokens]), bytes_context.SETTINGS
    )
    hold("64")
    hold("128")
    assert json.loads((tmp_path / "settings.json").read_text())["tokens_per_update"] == 128
    (tmp_path / "settings.json").unlink()
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(SystemExit, match=r"records but no settings.json.*\"tokens_per_update\": 128"):
        hold("128")
    assert not (tmp_path / "settings.json").exists()
    (tmp_path / "settings.json").write_text('{"preset": "bytes", ')  # cut short by hand
    with pytest.raises(SystemExit, match=r"settings.json is not JSON"):
        hold("128")
    (tmp_path / "settings.json").write_text(json.dumps(dict(preset="bytes", tokens_per_update=128, eval_windows=32)))
    hold("128")
    with pytest.raises(SystemExit, match=r"--tokens-per-update 64 \(the folder's: 128\)"):
        hold("64")
    (tmp_path / "settings.json").write_text(json.dumps(dict(preset="bytes", tokens_per_update=128)))
    with pytest.raises(SystemExit, match=r"--eval-windows 32 \(the folder's: not recorded\)"):
        hold("128")
