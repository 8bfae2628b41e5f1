"""train.py end to end, as a user runs it: exact resume, NaN handling, bad flags, eval.py after it
(several devices and processes: tests/test_distributed.py)."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ops
import sympow
from sympow import checkpoint, data, run_folder

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


def train(store, out, *flags, devices=1, check=True, log_compiles=False):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    if log_compiles:  # JAX logs "Compiling ..." for every computation it compiles
        env["JAX_LOG_COMPILES"] = "1"
    command = [sys.executable, str(ROOT / "train.py"), *SMALL_RUN, "--data", store, "--out", str(out), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if check and result.returncode:
        raise AssertionError(f"train.py failed:\n{result.stderr[-3000:]}")
    return result


def losses(out):
    return {r["step"]: r["loss"] for r in run_folder.read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def straight(store, tmp_path_factory):
    """60 uninterrupted steps: the losses every stopped and resumed run must give again."""
    out = tmp_path_factory.mktemp("straight")
    train(store, out, "--steps", "60", "--checkpoint-every", "30")
    return losses(out)


def test_resume_even_past_a_damaged_checkpoint_gives_the_uninterrupted_losses(store, straight, tmp_path):
    """Stopped at 3, resumed to 6; then the newest checkpoint is damaged, and the next resume
    warns, sets it aside, starts again from step 3 and still gives the uninterrupted losses."""
    train(store, tmp_path, "--steps", "3", "--checkpoint-every", "3")
    resumed = train(store, tmp_path, "--steps", "6", "--checkpoint-every", "3")
    assert "resuming from" in resumed.stdout
    assert losses(tmp_path) == {s: straight[s] for s in range(1, 7)}
    meta = json.loads((tmp_path / "step_0000006" / "meta.json").read_text())
    assert meta["position"] == 6 * 8 and meta["config"]["attention"] == "conformal"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000003", "step_0000006"]  # --keep 2

    state = tmp_path / "step_0000006" / "state.eqx"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a save cut short by a crash
    past_damage = train(store, tmp_path, "--steps", "9", "--checkpoint-every", "3")
    assert "step_0000006/state.eqx is damaged" in past_damage.stderr and "resuming from" in past_damage.stdout
    assert "step_0000003 (step 3)" in past_damage.stdout
    assert losses(tmp_path) == {s: straight[s] for s in range(1, 10)}
    assert (tmp_path / "step_0000006.damaged").is_dir()  # kept for a look, out of the run's way
    assert sorted(p.name for p in tmp_path.glob("step_???????")) == ["step_0000006", "step_0000009"]

    # Tokens per second is a rate at every step, checkpoint steps and the last included (it read
    # millions at checkpoint steps when it timed two reads in a row). Loose: timing on a shared machine.
    rates = [r["tokens_per_second"] for r in run_folder.read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert max(rates[1:]) < 20 * np.median(rates[1:]), rates


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(store, tmp_path):
    # An absurd learning rate blows the weights up within a few updates.
    result = train(store, tmp_path, "--steps", "20", "--checkpoint-every", "1", "--lr", "1e30", check=False)
    assert result.returncode != 0
    assert "stopping. The last good checkpoint is" in result.stderr
    bad_step = int(result.stderr.split("at step ")[1].split(";")[0])
    newest = f"step_{bad_step - 1:07d}"
    assert sorted(p.name for p in tmp_path.glob("step_*"))[-1] == newest and newest in result.stderr
    assert all(np.isfinite(loss) for loss in losses(tmp_path).values())


def compiles(result) -> int:
    return result.stderr.count("Compiling")


def test_sigterm_saves_says_where_to_resume_and_the_resume_is_exact(store, straight, tmp_path):
    """SIGTERM mid-run: a checkpoint at the next step boundary, where to resume, status 143. While
    it runs, a second train.py on its folder is refused, naming it; afterwards, a resume that
    changes --context is refused naming it, before anything compiles; one that changes
    --checkpoint-every goes on, records the change, and gives the uninterrupted run's losses."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, str(ROOT / "train.py"), *SMALL_RUN, "--data", store, "--out", str(tmp_path)]
    first = subprocess.Popen(
        [*command, "--steps", "60", "--checkpoint-every", "30"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and first.poll() is None, "the run never got going"
            time.sleep(0.2)
        second = train(store, tmp_path, "--steps", "60", check=False)
        assert second.returncode == 1 and f"in use by another run (host {socket.gethostname()}, pid {first.pid}" in (
            second.stderr
        ), second.stderr[-2000:]
        assert first.poll() is None, "the run ended before it could be stopped: make it longer"
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped_at = max(losses(tmp_path))
    assert stopped_at < 60
    saved = tmp_path / f"step_{stopped_at:07d}"
    assert f"stopped by SIGTERM at step {stopped_at}, saved as {saved}: run the same command to resume" in stderr
    assert saved.is_dir()

    refused = train(store, tmp_path, "--steps", "60", "--context", "64", check=False, log_compiles=True)
    assert refused.returncode == 2 and "--context: saved 32, now 64" in refused.stderr and compiles(refused) == 0

    train(store, tmp_path, "--steps", "60", "--checkpoint-every", "7")
    assert losses(tmp_path) == straight
    change = [r for r in run_folder.read_metrics(tmp_path / "metrics.jsonl") if "changed" in r]
    assert change == [dict(step=stopped_at, resumed_from=saved.name, changed=dict(checkpoint_every=[30, 7]))]


def test_a_save_that_fails_ends_the_run_with_the_cause_last_and_the_earlier_checkpoint_intact(store, tmp_path):
    """The disk fills up at the second save (a stand-in writer raises ENOSPC after half a file)."""
    script = f"""
import errno, importlib.util, os, sys
from sympow import checkpoint
real_write = checkpoint.write_file
def full_disk(path, write):
    if path.parent.name == ".step_0000002.partial" and path.name == "state.eqx":
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return real_write(path, write)
checkpoint.write_file = full_disk
spec = importlib.util.spec_from_file_location("train_script", {str(ROOT / "train.py")!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.main(sys.argv[1:])
"""
    flags = [*SMALL_RUN, "--data", store, "--out", str(tmp_path), "--steps", "4", "--checkpoint-every", "1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script, *flags], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "could not save checkpoint" in last and "No space left on device" in last, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".step", "step"))) == ["step_0000001"]
    checkpoint.verify(tmp_path / "step_0000001")


BAD_TRAIN_FLAGS = [
    (["--lr", "-1"], "argument --lr: must be > 0; got -1"),
    (["--clip", "0"], "argument --clip: must be > 0; got 0"),
    (["--micro-batch", "0"], "argument --micro-batch: must be >= 1; got 0"),
    (["--steps", "0"], "argument --steps: must be >= 1; got 0"),
    (["--checkpoint-every", "-1"], "argument --checkpoint-every: must be >= 1; got -1"),
    (["--context", "0"], "argument --context: must be >= 1; got 0"),
    (["--log-every", "0"], "argument --log-every: must be >= 1; got 0"),
    (["--keep", "0"], "argument --keep: must be >= 1; got 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number; got nan"),
    (["--warmup", "-3"], "argument --warmup: must be >= 0; got -3"),
    (["--p", "3"], "argument --p: must be an even power"),
    (["--tokens-per-update", "100"], "--tokens-per-update 100 must be a multiple of --context 32"),
    (["--micro-batch", "3"], "--micro-batch 3 must divide the 8 examples of an update"),
    (["--d-model", "60", "--heads", "8"], "d_model (60) must split into n_heads (8) heads of even size"),
    (["--heads", "0"], "argument --heads: must be >= 1; got 0"),
    (["--kv-heads", "3"], "n_kv_heads (3) must be a positive divisor of n_heads (4)"),
    (["--coordinator", "127.0.0.1:1"], "go together"),
    (["--coordinator", "nowhere", "--num-processes", "2", "--process-id", "0"], "must be HOST:PORT"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "--process-id must be in 0..1"),
    (["--heartbeat-timeout", "0"], "argument --heartbeat-timeout: must be >= 1; got 0"),
    (["--init-timeout", "0"], "argument --init-timeout: must be >= 1; got 0"),
]


@pytest.mark.parametrize("flags, message", BAD_TRAIN_FLAGS)
def test_each_bad_flag_value_is_refused_in_one_line_with_status_2(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        train_script().parse_args([*SMALL_RUN, *flags])
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("train.py: error: ") and message in line, line


def test_values_only_the_data_can_refuse_are_refused_before_anything_compiles(store, tmp_path):
    """The store's rows (256 tokens) and size (16 documents) are read before the model is built."""
    one_document = tmp_path / "one_document"
    data.write_split(str(one_document), "train", np.ones((1, 64)))
    cases = [
        (
            ["--context", "48", "--tokens-per-update", "96", "--micro-batch", "2"],
            store,
            "must divide the row length 256",
        ),
        (["--tokens-per-update", "8192"], store, "the store holds only 128"),
        ([], str(tmp_path / "nowhere"), "no token array at"),
        ([], str(one_document), "the store holds only 2"),
    ]
    for flags, store, message in cases:
        result = train(store, tmp_path / "out", *flags, check=False, log_compiles=True)
        assert result.returncode in (1, 2) and message in result.stderr, result.stderr[-2000:]
        assert compiles(result) == 0


def test_eval_writes_losses_by_position_and_plots(store, tmp_path):
    # The second run has grouped heads (the tiny preset's 4 over 2 key/value heads): eval reads
    # its config from the checkpoint.
    for context, flags in (("32", []), ("64", ["--kv-heads", "2"])):
        train(store, tmp_path / f"run{context}", "--steps", "2", "--context", context, *flags)
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


def script(name: str):
    """train.py or eval.py as a module."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py") + "_script", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_refuses_what_would_give_nan(store, tmp_path, capsys):
    """A checkpoint of another vocabulary, a heldout split with no documents, a run with no
    checkpoint, and values out of their domain: each a message, none a results.json of NaN."""
    config = sympow.ModelConfig(vocab_size=300, d_model=16, n_layers=1, n_heads=2, chunk_size=8)
    run = tmp_path / "small_vocabulary"
    checkpoint.save(run, 1, sympow.Transformer(config, key=jax.random.key(0)), None, 0, dict(context=32, data=store))
    empty_heldout = tmp_path / "empty_heldout"
    data.write_split(str(empty_heldout), "heldout", np.ones((0, 256)))
    (tmp_path / "no_checkpoint").mkdir()
    evaluate = script("eval.py").main
    cases = [
        ([str(run)], "token id", "past the model's vocabulary (ids 0..299)"),
        ([str(run), "--data", str(empty_heldout)], "holds no tokens", "heldout.zarr"),
        ([str(tmp_path / "no_checkpoint")], "holds no complete checkpoint", ""),
    ]
    for argv, *messages in cases:
        with pytest.raises(SystemExit) as stopped:
            evaluate([*argv, "--context", "32", "--out", str(tmp_path / "eval")])
        assert all(message in str(stopped.value.code) for message in messages), stopped.value.code
    for flags, message in [
        (["--context", "0"], "argument --context: must be >= 1"),
        (["--windows", "0"], "argument --windows: must be >= 1"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1"),
        (["--context", "32", "--windows", "-2"], "argument --windows: must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            evaluate([str(run), "--out", str(tmp_path / "eval"), "--context", "32", *flags])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "eval" / "results.json").exists()


def test_bfloat16_compute_trains_like_float32(store, tmp_path):
    train(store, tmp_path / "f32", "--steps", "2", "--dtype", "float32")
    train(store, tmp_path / "bf16", "--steps", "2", "--dtype", "bfloat16")
    f32, bf16 = losses(tmp_path / "f32"), losses(tmp_path / "bf16")
    np.testing.assert_allclose([bf16[1], bf16[2]], [f32[1], f32[2]], atol=0.05)


def train_script():
    return script("train.py")


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
            opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
            mask, stop = jnp.ones((2, 32), bool), jnp.zeros(1, jnp.int32)
            lowered = step.lower(model, opt_state, tokens, tokens, mask, stop).as_text()
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
