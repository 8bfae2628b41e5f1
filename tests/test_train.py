"""train.py end to end, as a user runs it: exact resume, NaN handling, bad flags, eval.py after it
(several devices and processes: tests/test_distributed.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ops
import sympow
from sympow import data

ROOT = Path(__file__).resolve().parents[1]
SMALL_RUN = [
    "--preset",
    "tiny",
    "--context",
    "32",
    "--tokens-per-update",
    "256",
    "--micro-batch",
    "4",
    "--log-every",
    "1",
    "--warmup",
    "1",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    tokens = np.random.default_rng(0).integers(0, 2000, size=(16, 256))
    data.write_split(str(root), "train", tokens)
    data.write_split(str(root), "heldout", tokens[:2])
    return str(root)


def train(store, out, *flags, devices=1, check=True):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, str(ROOT / "train.py"), *SMALL_RUN, "--data", store, "--out", str(out), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if check and result.returncode:
        raise AssertionError(f"train.py failed:\n{result.stderr[-3000:]}")
    return result


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(store, tmp_path):
    train(store, tmp_path / "straight", "--steps", "6", "--checkpoint-every", "3")
    train(store, tmp_path / "stopped", "--steps", "3", "--checkpoint-every", "3")
    resumed = train(store, tmp_path / "stopped", "--steps", "6", "--checkpoint-every", "3")
    assert "resuming from" in resumed.stdout
    straight, stopped = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(stopped) == list(range(1, 7))
    assert straight == stopped
    meta = json.loads((tmp_path / "stopped" / "step_0000006" / "meta.json").read_text())
    assert meta["position"] == 6 * 8 and meta["config"]["attention"] == "conformal"
    assert [p.name for p in (tmp_path / "stopped").glob("step_*")] == ["step_0000006"]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(store, tmp_path):
    # An absurd learning rate blows the weights up within a few updates.
    result = train(store, tmp_path, "--steps", "20", "--checkpoint-every", "1", "--lr", "1e30", check=False)
    assert result.returncode != 0
    assert "stopping. The last good checkpoint is" in result.stderr
    checkpoints = sorted(tmp_path.glob("step_*"))
    assert len(checkpoints) == 1
    bad_step = int(result.stderr.split("at step ")[1].split(";")[0])
    assert checkpoints[0].name == f"step_{bad_step - 1:07d}"
    assert all(np.isfinite(loss) for loss in losses(tmp_path).values())


def test_bad_flags_say_what_is_wrong(store, tmp_path):
    result = train(store, tmp_path, "--tokens-per-update", "100", check=False)
    assert result.returncode != 0 and "must be a multiple of --context" in result.stderr


def test_eval_writes_losses_by_position_and_plots(store, tmp_path):
    for context in ("32", "64"):
        train(store, tmp_path / f"run{context}", "--steps", "2", "--context", context)
    out = tmp_path / "eval"
    command = [
        sys.executable,
        str(ROOT / "eval.py"),
        str(tmp_path / "run32"),
        str(tmp_path / "run64"),
        "--context",
        "128",
        "--windows",
        "3",
        "--batch-size",
        "2",
        "--bins",
        "8",
        "--out",
        str(out),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["train_context"] for r in results] == [32, 64]
    for r in results:
        assert len(r["loss_by_position"]) == 128 and r["windows"] == 4 and r["eval_context"] == 128
        assert all(np.isfinite(r["loss_by_position"])) and abs(r["mean_loss"] - np.mean(r["loss_by_position"])) < 1e-9
    rows = (out / "loss_by_position.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 and rows[1].startswith("16,")
    for png in ("loss_by_position.png", "loss_by_training_context.png", "training_loss.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| conformal | 32 |" in result.stdout


def test_bfloat16_compute_trains_like_float32(store, tmp_path):
    train(store, tmp_path / "f32", "--steps", "2", "--dtype", "float32")
    train(store, tmp_path / "bf16", "--steps", "2", "--dtype", "bfloat16")
    f32, bf16 = losses(tmp_path / "f32"), losses(tmp_path / "bf16")
    np.testing.assert_allclose([bf16[1], bf16[2]], [f32[1], f32[2]], atol=0.05)


def train_script():
    """train.py as a module."""
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_training_step_never_calls_back_to_the_host():
    """The jitted step of every variant lowers with no host callback (ops' log_g check is one: the
    model's gates are <= 0 by construction, so it passes check_log_g=False), so nothing in it
    waits for Python."""
    script = train_script()
    for attention in sympow.ATTENTIONS:
        args = script.parse_args(["--attention", attention, "--context", "32", "--tokens-per-update", "64"])
        model = sympow.Transformer(script.model_config(args), key=jax.random.key(0))
        opt = script.optimizer(args)
        step = script.make_train_step(opt, jnp.float32, accumulation=1)
        tokens = jnp.zeros((2, 32), jnp.int32)
        with jax.numpy_dtype_promotion("standard"):
            lowered = step.lower(model, opt.init(eqx.filter(model, eqx.is_inexact_array)), tokens, tokens).as_text()
        assert "callback" not in lowered, attention
    # The check it leaves out is one, and shows in a lowering:
    q = jnp.ones((1, 4, 1, 8), jnp.float32)
    assert "callback" in jax.jit(lambda q, g: ops.sympow_attention(q, q, q, g)).lower(q, q[..., 0]).as_text()


def test_weight_decay_shrinks_matrices_only():
    """With zero gradients an AdamW update is the decay alone: -lr wd x for matrices, and nothing
    for LayerNorm scales and biases (vectors)."""
    script = train_script()
    args = script.parse_args(["--weight-decay", "0.5", "--lr", "0.1", "--warmup", "0"])
    params = eqx.filter(sympow.Transformer(script.model_config(args), key=jax.random.key(0)), eqx.is_inexact_array)
    opt = script.optimizer(args)
    with jax.numpy_dtype_promotion("standard"):  # as train.py runs (optax's schedules mix int and float)
        updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    shapes = set()
    for update, param in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
        expected = -0.1 * 0.5 * param if param.ndim >= 2 else jnp.zeros_like(param)
        np.testing.assert_allclose(update, expected, rtol=1e-6, atol=0)
        shapes.add(param.ndim >= 2)
    assert shapes == {True, False}, "the model has both matrices and vectors"
