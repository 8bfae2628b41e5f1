"""Several processes as one run, on JAX's distributed runtime with CPU collectives (gloo): two
processes on this machine stand in for two hosts. The input pipeline reads ahead of the step."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_train import ROOT, SMALL_RUN, losses, train

from sympow import data
from sympow.launch import free_port

STEPS = ["--steps", "20", "--checkpoint-every", "10"]


LAUNCH = [sys.executable, "-m", "sympow.launch", "--num-processes", "2", "--cpu-devices", "1", "--grace", "30"]


def launch(script, *flags):
    """A script on 2 processes of one CPU device each, through sympow.launch."""
    result = subprocess.run([*LAUNCH, "--", str(ROOT / script), *flags], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def launch_training(store, out, *flags):
    return launch("train.py", *SMALL_RUN, "--data", store, "--out", str(out), *flags)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    tokens = np.random.default_rng(0).integers(0, 2000, size=(16, 256))
    data.write_split(str(root), "train", tokens)
    data.write_split(str(root), "heldout", tokens[:2])
    return str(root)


def test_two_processes_train_as_one_and_resume_exactly(store, tmp_path):
    """20 steps of the tiny conformal model: 2 processes x 1 device give 1 x 2's losses exactly and
    1 x 1's to float32 round-off (measured: 8.8e-8 relative, the gradient mean taken in another
    order); 2 processes stopped at
    step 10 and started again match the uninterrupted run exactly; each process read its half
    of every batch and nothing more."""
    two = launch_training(store, tmp_path / "two_processes", *STEPS)
    train(store, tmp_path / "two_devices", *STEPS, devices=2)
    train(store, tmp_path / "one_device", *STEPS, devices=1)
    by_processes, by_devices, alone = (
        losses(tmp_path / name) for name in ("two_processes", "two_devices", "one_device")
    )
    assert sorted(by_processes) == list(range(1, 21))
    assert by_processes == by_devices  # two addends sum alike in any order
    steps = range(1, 21)
    np.testing.assert_allclose([by_processes[s] for s in steps], [alone[s] for s in steps], rtol=1e-6)
    assert "in 2 processes" in two.stdout
    local_batch = 8 // 2  # SMALL_RUN: 256 tokens per update at context 32, split over 2 processes
    assert sorted(re.findall(r"process (\d) of 2: read (\d+) windows", two.stdout)) == [
        ("0", str(20 * local_batch)),
        ("1", str(20 * local_batch)),
    ]

    # SIGTERM to the launcher: it passes it on, and both processes stop at the same step (the
    # request travels through the step), process 0 having saved there; the resume is exact.
    stopped = tmp_path / "stopped"
    launcher = subprocess.Popen(
        [*LAUNCH, "--", str(ROOT / "train.py"), *SMALL_RUN, "--data", store, "--out", str(stopped), *STEPS],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # each line as it is printed
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in launcher.stdout:  # the run's description: both processes hold their signal handlers
            if "in 2 processes" in line:
                break
        launcher.send_signal(signal.SIGTERM)
        _, stderr = launcher.communicate(timeout=180)
    finally:
        launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped_at = max(losses(stopped))
    assert stopped_at < 20 and (stopped / f"step_{stopped_at:07d}").is_dir()
    assert f"stopped by SIGTERM at step {stopped_at}" in stderr
    resumed = launch_training(store, stopped, *STEPS)
    assert "resuming from" in resumed.stdout
    assert losses(stopped) == by_processes

    # eval.py: each process evaluates its share of the windows; process 0 sums them.
    evaluation = ["--context", "64", "--windows", "4", "--bins", "4"]  # the default batch: one window a process
    launch("eval.py", str(tmp_path / "stopped"), *evaluation, "--out", str(tmp_path / "eval_two"))
    alone_command = [sys.executable, str(ROOT / "eval.py"), str(tmp_path / "stopped"), *evaluation]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(
        [*alone_command, "--out", str(tmp_path / "eval_one")], check=True, cwd=ROOT, capture_output=True, env=env
    )
    two_results, one_result = (
        json.loads((tmp_path / name / "results.json").read_text()) for name in ("eval_two", "eval_one")
    )
    np.testing.assert_allclose(two_results[0]["loss_by_position"], one_result[0]["loss_by_position"], rtol=1e-6)


def test_a_process_that_dies_takes_the_run_down_with_a_clear_error(store, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    flags = [*SMALL_RUN, "--data", store, "--out", str(tmp_path), "--steps", "100000", "--heartbeat-timeout", "10"]
    processes = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *flags]
            + ["--coordinator", address, "--num-processes", "2", "--process-id", str(index)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and processes[0].poll() is None, "the run never got going"
            time.sleep(0.5)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = processes[0].communicate(timeout=90)
        print(f"process 0 stopped {time.monotonic() - killed:.1f} s after process 1 was killed")
        assert processes[0].returncode != 0
        assert "another one stopped or lost its connection" in stderr, stderr[-3000:]
    finally:
        for process in processes:
            process.kill()


class SlowStream(data.WindowStream):
    """A store that takes 50 ms a read, as a remote one might."""

    def read(self, first: int, count: int) -> np.ndarray:
        time.sleep(0.05)
        return super().read(first, count)


def steps_per_second(stream, steps: int = 20, step_seconds: float = 0.06) -> float:
    """The step loop with a stand-in step of step_seconds (the devices' work), fed by a prefetcher."""
    prefetcher = data.Prefetcher(stream, count=steps)
    start = time.perf_counter()
    for _ in range(steps):
        prefetcher.next()
        time.sleep(step_seconds)
    prefetcher.close()
    return steps / (time.perf_counter() - start)


def test_a_slow_store_costs_the_step_loop_nothing_while_reading_ahead_keeps_up(store):
    """Loosely (timing on a shared machine): with 50 ms reads behind 60 ms steps, the loop keeps
    most of the in-memory store's pace; read in line, it would lose 45%. benchmarks/README.md has
    the measured figures."""
    array = data.open_split(store, "train")
    fast = steps_per_second(data.WindowStream(array, 32, 8))
    slow = steps_per_second(SlowStream(array, 32, 8))
    assert slow > 0.85 * fast, (slow, fast)


def test_a_read_error_comes_out_of_the_step_loop(store):
    class Broken(data.WindowStream):
        def read(self, first: int, count: int) -> np.ndarray:
            raise data.CorruptData("documents 3..4 hold an all-zero row")

    prefetcher = data.Prefetcher(Broken(data.open_split(store, "train"), 32, 8), count=5)
    with pytest.raises(data.CorruptData, match="all-zero row"):
        prefetcher.next()
    prefetcher.close()


def test_a_peer_that_never_starts_ends_process_0_within_the_deadline_naming_it(store, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    flags = [*SMALL_RUN, "--data", store, "--out", str(tmp_path), "--init-timeout", "3"]
    command = [sys.executable, str(ROOT / "train.py"), *flags, "--coordinator", address, "--num-processes", "3"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    started = time.monotonic()
    process_2 = subprocess.Popen([*command, "--process-id", "2"], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    process_0 = subprocess.run(
        [*command, "--process-id", "0"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    print(f"process 0 ended {time.monotonic() - started:.1f} s after it started, imports included")
    assert process_0.returncode == 1
    assert "process(es) 1 of 3 did not join within 3 s (--init-timeout)" in process_0.stderr, process_0.stderr[-2000:]
    _, stderr_2 = process_2.communicate(timeout=60)
    assert process_2.returncode == 1 and "did not gather the run within 3 s" in stderr_2, stderr_2[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_bad_launch_flags_are_refused_before_anything_starts(capsys):
    from sympow import launch

    for argv, message in (
        (["--num-processes", "0", "--", "train.py"], "argument --num-processes: must be >= 1; got 0"),
        (["--num-processes", "2"], "give the script to run after --"),
        (["--num-processes", "2", "--cpu-devices", "0", "--", "x.py"], "argument --cpu-devices: must be >= 1"),
        (["--num-processes", "2", "--port", "70000", "--", "x.py"], "argument --port: must be <= 65535"),
        (["--num-processes", "2", "--grace", "-1", "--", "x.py"], "argument --grace: must be >= 0"),
    ):
        with pytest.raises(SystemExit) as stopped:
            launch.parse_args(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err
