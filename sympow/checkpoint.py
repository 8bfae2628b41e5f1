"""Atomic checkpoints: one folder step_NNNNNNN/ per save, with the model and optimizer state
(state.eqx, model first so that the model alone can be read back) and meta.json (step, data
position, model config, the run's arguments)."""

import dataclasses
import json
import shutil
from pathlib import Path

import equinox as eqx
import jax

from sympow.config import ModelConfig
from sympow.transformer import Transformer

PREFIX = "step_"


def save(out: Path, step: int, model: Transformer, opt_state, position: int, args: dict) -> Path:
    """Write step_NNNNNNN/ under a temporary name and rename it into place, then drop older ones."""
    final = out / f"{PREFIX}{step:07d}"
    partial = out / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    eqx.tree_serialise_leaves(partial / "state.eqx", (model, opt_state))
    meta = dict(step=step, position=position, config=dataclasses.asdict(model.config), args=args)
    (partial / "meta.json").write_text(json.dumps(meta, default=str, indent=1))
    partial.rename(final)
    for older in sorted(out.glob(f"{PREFIX}*"))[:-1]:
        shutil.rmtree(older)
    return final


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint under out, or None."""
    checkpoints = sorted(out.glob(f"{PREFIX}*"))
    return checkpoints[-1] if checkpoints else None


def meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def resume(path: Path, model: Transformer, opt_state):
    """(model, opt_state, step, position) from a checkpoint written with the same model config."""
    saved = meta(path)
    if saved["config"] != dataclasses.asdict(model.config):
        raise ValueError(f"{path} holds a model with config {saved['config']}, not {dataclasses.asdict(model.config)}")
    model, opt_state = eqx.tree_deserialise_leaves(path / "state.eqx", (model, opt_state))
    return model, opt_state, saved["step"], saved["position"]


def load_model(run: Path) -> tuple[Transformer, dict]:
    """The model of a run's latest checkpoint (a run folder or a checkpoint folder), and its meta."""
    path = run if (run / "meta.json").exists() else latest(run)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {run}")
    saved = meta(path)
    skeleton = Transformer(ModelConfig(**saved["config"]), key=jax.random.key(0))
    return eqx.tree_deserialise_leaves(path / "state.eqx", skeleton), saved
