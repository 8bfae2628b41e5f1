"""Tokens per second of the tiny model on this machine: 1 process x 1 device, 1 process x 2
devices and 2 processes x 1 device (sympow.launch), with the time the step loop waited for data;
then the step loop fed by a store that takes 50 ms a read, against an in-memory one, with the
batches read ahead (as train.py does) and read in line.

    .venv/bin/python benchmarks/distributed.py          # about 6 minutes on 2 cores

Each training run is train.py on a store written here (tiny preset, context 256, 4096 tokens an
update, 40 steps, medians over steps 11..40). The read-ahead part runs train.py's own jitted
step of the tiny model at context 32, 256 tokens an update, so that a step is short beside
50 ms.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from sympow import data

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--preset", "tiny", "--context", "256", "--tokens-per-update", "4096", "--steps", "40", "--log-every", "1"]
CONFIGURATIONS = {  # name: (processes, devices per process)
    "1 process x 1 device": (1, 1),
    "1 process x 2 devices": (1, 2),
    "2 processes x 1 device": (2, 1),
}


def train(store: str, out: Path, processes: int, devices: int) -> dict:
    flags = [*RUN, "--data", store, "--out", str(out), "--checkpoint-every", "1000"]
    if processes == 1:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], check=True, env=env, capture_output=True)
    else:
        launcher = [sys.executable, "-m", "sympow.launch", "--num-processes", str(processes)]
        command = [*launcher, "--cpu-devices", str(devices), "--", str(ROOT / "train.py"), *flags]
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][10:]
    return dict(
        tokens_per_second=statistics.median(r["tokens_per_second"] for r in records),
        data_wait_ms=1e3 * statistics.median(r["data_wait_per_step"] for r in records),
    )


class SlowStream(data.WindowStream):
    def read(self, first: int, count: int) -> np.ndarray:
        time.sleep(0.05)
        return super().read(first, count)


def step_loop(stream, step, state, read_ahead: bool, steps: int = 30) -> float:
    """Steps a second of train.py's jitted step, its batches from stream."""
    prefetcher = data.Prefetcher(stream, count=steps) if read_ahead else None
    start = time.perf_counter()
    loss = None
    for _ in range(steps):
        inputs, targets = prefetcher.next()[:2] if read_ahead else stream.next_batch()[:2]
        *state, loss, _ = step(*state, inputs, targets)
    jax.block_until_ready(loss)
    return steps / (time.perf_counter() - start)


def read_ahead_figures(store: str, out: Path) -> dict:
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    args = train_script.parse_args(
        ["--context", "32", "--tokens-per-update", "256", "--data", store, "--out", str(out)]
    )
    run, opt, _ = train_script.set_up(args)
    step = train_script.make_train_step(opt, jax.numpy.float32, accumulation=1)
    split = data.open_split(store, "train")
    state = (run.model, run.opt_state)
    step_loop(data.WindowStream(split, 32, 8), step, state, read_ahead=False, steps=3)  # compile
    figures = {}
    for read_ahead in (True, False):
        for name, stream_type in (("in memory", data.WindowStream), ("50 ms a read", SlowStream)):
            figures[(read_ahead, name)] = step_loop(stream_type(split, 32, 8), step, state, read_ahead)
    return figures


def main():
    with tempfile.TemporaryDirectory() as folder:
        store = str(Path(folder) / "store")
        tokens = np.random.default_rng(0).integers(0, 50000, size=(64, 4096))
        data.write_split(store, "train", tokens)
        data.write_split(store, "heldout", tokens[:2])
        print("| configuration | tokens/s (median) | vs 1 x 1 | data wait per step (ms, median) |\n|---|---|---|---|")
        base = None
        for name, (processes, devices) in CONFIGURATIONS.items():
            figures = train(store, Path(folder) / name.replace(" ", "_"), processes, devices)
            base = base or figures["tokens_per_second"]
            print(
                f"| {name} | {figures['tokens_per_second']:.0f} | {figures['tokens_per_second'] / base:.2f}x"
                f" | {figures['data_wait_ms']:.2f} |",
                flush=True,
            )
        figures = read_ahead_figures(store, Path(folder) / "read_ahead")
        print("\n| batches | store | steps/s | vs in memory |\n|---|---|---|---|")
        for read_ahead in (True, False):
            memory = figures[(read_ahead, "in memory")]
            for name in ("in memory", "50 ms a read"):
                label = "read ahead" if read_ahead else "read in line"
                speed = figures[(read_ahead, name)]
                print(f"| {label} | {name} | {speed:.2f} | {speed / memory:.2f}x |")


if __name__ == "__main__":
    main()
