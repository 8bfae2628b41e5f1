"""How long a checkpoint takes to save and to verify: the 124m model with its AdamW moments.

    python benchmarks/checkpoint_save.py [--preset 124m] [--saves 3] [--folder /tmp]

Prints, per save, the size of state.eqx, the whole save (serialise, fsync, SHA-256 read-back,
rename), a plain `eqx.tree_serialise_leaves` of the same state beside it, and `verify`.
docs/decisions.md has the figures of the 2-core CPU machine.
"""

import argparse
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import optax

import sympow
from sympow import checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="124m", choices=tuple(sympow.PRESETS))
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    model = sympow.Transformer(sympow.preset(args.preset), key=jax.random.key(0))
    opt_state = optax.adamw(1e-3).init(eqx.filter(model, eqx.is_inexact_array))
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        out = Path(folder)
        for step in range(1, args.saves + 1):
            start = time.perf_counter()
            path = checkpoint.save(out, step, model, opt_state, 0, {})
            saved = time.perf_counter() - start
            start = time.perf_counter()
            eqx.tree_serialise_leaves(out / "plain.eqx", (model, opt_state))
            plain = time.perf_counter() - start
            start = time.perf_counter()
            checkpoint.verify(path)
            verified = time.perf_counter() - start
            size = (path / "state.eqx").stat().st_size / 1e9
            print(f"{size:.2f} GB: save {saved:.2f} s (plain serialise {plain:.2f} s), verify {verified:.2f} s")


if __name__ == "__main__":
    main()
