"""A training run's folder (--out): one writer at a time, one metrics file that reads as one run,
and a resume that continues the same run or is refused.

- `RunLock`: a second train.py on the same folder is refused, naming the first. The lock is an
  flock on out/.lock, which the kernel releases however its holder ends (a crash, SIGKILL), so a
  lock left by a dead process is simply taken over; the file says who holds it.
- `open_metrics`: metrics.jsonl cut back to the resumed step (a line half-written by a killed run
  dropped), then appended to.
- `resume_differences`: what a resume changed. Settings that give the saved state or the data
  position their meaning must match (`FIXED`); the others may change and are recorded.
"""

import fcntl
import json
import os
import socket
import time
from pathlib import Path

# A saved data position counts windows of `context` tokens in `data`, `tokens_per_update` of
# them a step, so these three give it its meaning; the model's settings give the saved weights
# theirs; the seed names the run (its initialisation, and so every later step).
FIXED = (
    *("data", "context", "tokens_per_update", "seed"),
    *("attention", "p", "preset", "chunk_size", "layers", "d_model", "heads", "kv_heads", "mlp_ratio"),
    *("token_shift", "gate_init"),
)
# Where the run is, and how its processes meet, say nothing about what it computes.
NOT_SETTINGS = ("out", "distributed", "coordinator", "num_processes", "process_id", "heartbeat_timeout", "init_timeout")


class FolderInUse(Exception):
    """Another live process holds the run folder's lock."""


class RunLock:
    """Held while a process writes a run folder; `release` (or the process ending) frees it."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        self.descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.read()
            os.close(self.descriptor)
            raise FolderInUse(
                f"{out} is in use by another run ({holder or 'holder unknown'}): wait for it to end, stop it, "
                "or choose another --out"
            ) from None
        self.stale_holder = self.read()  # what a process that died holding it wrote, if any
        os.ftruncate(self.descriptor, 0)
        os.pwrite(self.descriptor, f"host {socket.gethostname()}, pid {os.getpid()}, since {time.ctime()}".encode(), 0)

    def read(self) -> str:
        return os.pread(self.descriptor, 4096, 0).decode(errors="replace").strip()

    def release(self) -> None:
        os.ftruncate(self.descriptor, 0)  # an empty file: free, and left by nobody who died
        os.close(self.descriptor)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, without a last line that a killed run left half-written."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}, is not JSON: {line[:80]!r}") from None
    return records


def open_metrics(path: Path, step: int):
    """metrics.jsonl for appending, after cutting it back to the records of steps 1..step (a
    resumed run writes the later ones again), rewritten whole under another name and renamed."""
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
    partial.replace(path)
    return path.open("a")


def as_saved(args: dict) -> dict:
    """The run's arguments as a checkpoint's meta.json holds them (paths as strings)."""
    return json.loads(json.dumps(args, default=str))


def resume_differences(saved: dict, args: dict) -> tuple[list[str], dict]:
    """(a line for each FIXED setting that differs, {setting: [saved, now]} for the others that do).
    A setting the saved run did not have (an older version's) is not a difference."""
    saved, now = as_saved(saved), as_saved(args)
    differing = [name for name in now if name in saved and saved[name] != now[name] and name not in NOT_SETTINGS]
    refused = [
        f"--{name.replace('_', '-')}: saved {saved[name]!r}, now {now[name]!r}" for name in differing if name in FIXED
    ]
    changed = {name: [saved[name], now[name]] for name in differing if name not in FIXED}
    return refused, changed
