"""Checkpoints the program owns: one folder step_NNNNNNN/ per save, complete or absent.

A checkpoint holds state.eqx (the model, then the optimizer state, so that the model alone can be
read back), meta.json (step, data position, model config, the run's arguments) and, written
last, manifest.json with the size and SHA-256 of each of the others. It is written under a
hidden temporary name and renamed into place, so a reader never sees half of one; a folder is a
checkpoint only if its name is exactly what `save` writes (step_ and the step number), so copies
such as step_0000010.bak or step_best are the user's and are never read or deleted; it is
complete only if its manifest lists every file and every file matches it. An incomplete or
damaged checkpoint is skipped with a warning naming it, and the newest complete one is used.

The last `keep` checkpoints are kept (2 by default, so that one damaged file never leaves
nothing to resume from), and every `keep_every`-th step's forever if asked.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax

from sympow.config import ModelConfig
from sympow.transformer import Transformer

NAME = re.compile(r"step_(\d{7,})")  # step_ + the step, at least 7 digits, as `save` names it
FILES = ("state.eqx", "meta.json")
MANIFEST = "manifest.json"


class DamagedCheckpoint(Exception):
    """A checkpoint folder that is incomplete, or whose files do not match its manifest."""


class SaveFailed(Exception):
    """A save that could not be written (disk full, permission): nothing of it was left behind."""


def folder(out: Path, step: int) -> Path:
    return out / f"step_{step:07d}"


def program_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder under out named as `save` names them, oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m[1]), path) for path in out.iterdir() if (m := NAME.fullmatch(path.name)) and path.is_dir()]
    return sorted(found)


def digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def verify(path: Path) -> None:
    """Raise DamagedCheckpoint unless every file of the checkpoint is there and matches its manifest.

    A folder written before checkpoints had manifests (meta.json and state.eqx, no manifest.json)
    is accepted unverified: the old saver renamed it into place only once complete."""
    if not (path / MANIFEST).exists():
        if all((path / name).is_file() for name in FILES):
            return
        raise DamagedCheckpoint(f"{path} is incomplete (no {MANIFEST}: its save did not finish)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise DamagedCheckpoint(f"{path}/{MANIFEST} is damaged ({error})") from None
    for name in FILES:
        file = path / name
        if name not in files or not file.is_file():
            raise DamagedCheckpoint(f"{path} is incomplete ({name} is missing)")
        if file.stat().st_size != files[name]["bytes"] or digest(file) != files[name]["sha256"]:
            raise DamagedCheckpoint(f"{path}/{name} is damaged (it does not match the checksum saved with it)")


def warn_to_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def latest(out: Path, warn: Callable[[str], None] = warn_to_stderr) -> Path | None:
    """The newest complete checkpoint under out (each newer one skipped with a warning), or None."""
    for _, path in reversed(program_checkpoints(out)):
        try:
            verify(path)
            return path
        except DamagedCheckpoint as error:
            warn(f"{error}; skipping it")
    return None


def write_file(path: Path, write: Callable) -> dict:
    """Write one file through `write(path)`, flush it to the disk, and return its manifest entry."""
    write(path)
    with path.open("rb") as file:
        os.fsync(file.fileno())
    return dict(bytes=path.stat().st_size, sha256=digest(path))


def save(
    out: Path, step: int, model: Transformer, opt_state, position: int, args: dict, *, keep: int = 2, keep_every=None
) -> Path:
    """Write step_NNNNNNN/ under a temporary name, rename it into place, then drop the checkpoints
    that `keep` and `keep_every` do not keep. Raises SaveFailed, with nothing left behind and the
    earlier checkpoints untouched, if the disk refuses a write."""
    final = folder(out, step)
    partial = out / f".{final.name}.partial"
    meta = dict(step=step, position=position, config=dataclasses.asdict(model.config), args=args)
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        files = {
            "state.eqx": write_file(partial / "state.eqx", lambda p: eqx.tree_serialise_leaves(p, (model, opt_state))),
            "meta.json": write_file(partial / "meta.json", lambda p: p.write_text(json.dumps(meta, default=str))),
        }
        write_file(partial / MANIFEST, lambda p: p.write_text(json.dumps(dict(files=files), indent=1)))
        if final.exists():  # a damaged checkpoint of the same step, skipped when this run resumed
            shutil.rmtree(final)
        partial.rename(final)
        sync_folder(out)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise SaveFailed(
            f"could not save checkpoint {final} ({error}); the earlier checkpoints are as they were"
        ) from error
    drop_old(out, keep, keep_every)
    return final


def sync_folder(path: Path) -> None:
    """Flush a folder's entries (a rename) to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def drop_old(out: Path, keep: int, keep_every: int | None) -> None:
    """Remove the program's checkpoints older than the newest `keep`, except every `keep_every`-th."""
    saved = program_checkpoints(out)
    for step, path in saved[:-keep]:
        if not (keep_every and step % keep_every == 0):
            shutil.rmtree(path)


def set_aside_newer(out: Path, step: int) -> None:
    """Rename the program's checkpoints newer than `step` (the damaged ones a resume skipped) to
    step_NNNNNNN.damaged: out of the way of the run's saves and of `drop_old`, kept for a look."""
    for newer_step, path in program_checkpoints(out):
        if newer_step > step:
            aside = path.with_name(path.name + ".damaged")
            path.rename(aside if not aside.exists() else path.with_name(f"{aside.name}-{time.time_ns()}"))


def remove_partials(out: Path) -> None:
    """Remove what interrupted saves left (only the run folder's lock holder may)."""
    for partial in out.glob(".step_*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def restore(path: Path, tree):
    """Read state.eqx of a verified checkpoint into the shape of `tree`."""
    try:
        return eqx.tree_deserialise_leaves(path / "state.eqx", tree)
    except Exception as error:  # equinox and numpy raise several kinds; all mean the file does not fit
        raise DamagedCheckpoint(f"{path}/state.eqx cannot be read as this model ({type(error).__name__})") from None


def resume(path: Path, model: Transformer, opt_state):
    """(model, opt_state, step, position) from a verified checkpoint of the same model config."""
    saved = meta(path)
    model, opt_state = restore(path, (model, opt_state))
    return model, opt_state, saved["step"], saved["position"]


def load_model(run: Path) -> tuple[Transformer, dict]:
    """The model of a run's newest complete checkpoint (a run folder) or of a checkpoint folder,
    and its meta. FileNotFoundError if there is none; DamagedCheckpoint for a damaged folder."""
    if not run.exists():
        raise FileNotFoundError(f"{run} does not exist")
    if (run / "meta.json").exists() or (run / MANIFEST).exists():
        verify(run)
        path = run
    elif (path := latest(run)) is None:
        raise FileNotFoundError(f"{run} holds no complete checkpoint (step_NNNNNNN/)")
    saved = meta(path)
    skeleton = Transformer(ModelConfig(**saved["config"]), key=jax.random.key(0))
    return restore(path, skeleton), saved
