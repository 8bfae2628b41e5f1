"""Choose the chunked Triton kernels' tilings by timing them: forward + backward of the chunked
path (p = 2), the defaults first, then one kernel's tiling (or the scans' value columns) changed
at a time, then every change that beat the defaults together, all in one run.

    python -m ops.tune --out runs/tune.json       # on a GPU: T = 65536, 8 heads, d = 64, bf16
    python -m ops.tune --seq 64 --heads 1 --dim 16 --chunk-sizes 32   # on a CPU: the interpreter

Candidates are the tilings that compiled for sm_90 at d = 64 in bf16, as jax-triton compiles
them, with at most 32 bytes a thread of ptxas spills (triton 3.6 and 3.7); one that does not
fit a shape here is reported as an error and the sweep goes on. Every setting's outputs (y, dq,
dk, dv and the gates' gradient) are compared with the defaults': a tiling that computes
something else shows there. On a CPU the same tilings run in Triton's interpreter (a check
that results do not depend on the tiling, not a measure of speed).
"""

import argparse
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ops.benchmark import TimeLimit, describe_error, describe_machine, make_inputs, timed, write_json
from ops.sympow.triton.chunked import (
    SCAN_VALUE_COLUMNS,
    chunk_gates,
    chunked_backward,
    chunked_forward,
    gpu_tilings,
    power_chunk_backward_keys,
    power_chunk_backward_queries,
    power_chunk_forward,
    power_state_scan,
    power_state_scan_backward,
)
from ops.sympow.triton.launch import Tiling, on_gpu, tilings

# Tiling(query rows, key rows, warps, pipeline stages). The scans step over BLOCK_N keys
# (forward) or BLOCK_M queries (backward) a time; their other row count, unused, is set alike.
CANDIDATES = {
    power_state_scan: [Tiling(n, n, w) for n in (32, 64, 128) for w in (4, 8)],
    # 128 rows with 4 warps spilled 44 bytes and more but for 32 keys a tile.
    power_chunk_forward: [Tiling(64, n, w) for n in (32, 64) for w in (4, 8)] + [Tiling(128, n, 8) for n in (32, 64, 128)] + [Tiling(128, 32, 4)],
    power_chunk_backward_queries: [Tiling(32, 32, 8, 2), Tiling(64, 32, 8, 2), Tiling(64, 32, 4, 2), Tiling(64, 32, 8, 3), Tiling(128, 32, 8, 3)],
    power_state_scan_backward: [Tiling(m, m, w) for m in (32, 64, 128) for w in (4, 8)],
    # 64 x 64 spilled 168 bytes and more.
    power_chunk_backward_keys: [Tiling(32, 32, 8, 2), Tiling(64, 32, 8, 2), Tiling(64, 32, 4, 3), Tiling(32, 64, 8, 2), Tiling(32, 32, 8, 3)],
}
SCAN_VALUE_COLUMN_CANDIDATES = (16, 32, 64)
# Largest relative difference from the defaults' outputs that still counts as the same result:
# bf16 outputs summed in another order differ by an ulp (2^-8 relative), a wrong tile by O(1).
SAME_RESULT = 1e-2


def describe(tiling: Tiling) -> str:
    return f"{tiling.query_rows}x{tiling.key_rows} rows, {tiling.num_warps} warps, {tiling.num_stages} stages"


def forward_backward(scale: float, chunk_size: int, tuning: dict):
    """(y, dq, dk, dv, dL) of the chunked kernels with these Plan arguments, jitted."""

    def run(q, k, v, log_g, dy):
        L = chunk_gates(log_g, chunk_size)
        y, log_normaliser, S, z = chunked_forward(q, k, v, L, scale, chunk_size, **tuning)
        return (y, *chunked_backward(q, k, v, L, y, log_normaliser, S, z, dy, scale, chunk_size, **tuning))

    return jax.jit(run)


def single_changes(chunk_size: int, defaults: dict):
    """(label, Plan arguments) for each candidate that differs from the defaults and whose tiles
    fit whole in a chunk."""
    for kernel, candidates in CANDIDATES.items():
        for tiling in candidates:
            if tiling != defaults[kernel] and chunk_size % tiling.query_rows == 0 and chunk_size % tiling.key_rows == 0:
                yield f"{kernel.__name__}: {describe(tiling)}", dict(tiling_overrides={kernel: tiling})
    for columns in SCAN_VALUE_COLUMN_CANDIDATES:
        if columns != SCAN_VALUE_COLUMNS:
            yield f"both scans: {columns} value columns", dict(scan_value_columns=columns)


def largest_difference(outputs, reference) -> float:
    """max over the outputs of max |a - b| / max |b|."""
    pairs = ((np.asarray(a, np.float32), np.asarray(b, np.float32)) for a, b in zip(outputs, reference))
    return max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) for a, b in pairs)


def measure(label: str, tuning: dict, inputs, reference, args, scale: float, chunk_size: int, limit: TimeLimit):
    """(row, outputs): the row has seconds and the outputs' difference from the reference's (if
    any), or the error that stopped the setting (outputs None)."""
    row = dict(chunk_size=chunk_size, setting=label)
    if limit.reached():
        return row | dict(error=TimeLimit.NOT_RUN), None
    try:
        seconds, outputs = timed(forward_backward(scale, chunk_size, tuning), inputs, args.repeats)
    except Exception as error:  # a tiling that does not compile or fit here: report it, go on
        return row | dict(error=describe_error(error)), None
    difference = {} if reference is None else dict(difference=largest_difference(outputs, reference))
    return row | dict(seconds=seconds) | difference, outputs


def combined(rows, settings: dict) -> dict:
    """Every single change that beat the defaults at this chunk size (the fastest per kernel), together."""
    base = next(r["seconds"] for r in rows if r["setting"] == "defaults")
    winners, overrides = {}, {}
    for row in rows:
        if row.get("difference", math.inf) < SAME_RESULT and row["seconds"] < base:
            kernel = row["setting"].split(":")[0]
            if kernel not in winners or row["seconds"] < winners[kernel]["seconds"]:
                winners[kernel] = row
    tuning = {}
    for row in winners.values():
        change = settings[row["setting"]]
        overrides |= change.get("tiling_overrides", {})
        tuning |= {k: v for k, v in change.items() if k != "tiling_overrides"}
    return tuning | (dict(tiling_overrides=overrides) if overrides else {})


def sweep(args, title: str) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    q, k, v, log_g = make_inputs(1, args.seq, args.heads, args.dim, dtype)
    dy = jax.random.normal(jax.random.key(1), v.shape, dtype)
    inputs, scale = (q, k, v, log_g, dy), 1 / math.sqrt(args.dim)
    defaults = tilings(gpu_tilings(args.dim, dtype.itemsize))  # the interpreter's on a CPU
    rows, limit = [], TimeLimit(args.max_minutes)
    for chunk_size in args.chunk_sizes:
        settings = dict(single_changes(chunk_size, defaults))
        defaults_row, reference = measure("defaults", {}, inputs, None, args, scale, chunk_size, limit)
        chunk_rows = [defaults_row]
        for label, tuning in tqdm(settings.items(), desc=f"chunk {chunk_size}"):
            chunk_rows.append(measure(label, tuning, inputs, reference, args, scale, chunk_size, limit)[0])
            write_json(args.out, args, rows + chunk_rows, title=title)
        best = combined(chunk_rows, settings) if reference is not None else {}
        if best:
            chunk_rows.append(measure("all faster changes together", best, inputs, reference, args, scale, chunk_size, limit)[0])
        rows += chunk_rows
        write_json(args.out, args, rows, title=title)
    return rows


def table(rows) -> str:
    base = {r["chunk_size"]: r["seconds"] for r in rows if r["setting"] == "defaults" and "seconds" in r}
    lines = ["| chunk | setting | ms | defaults / this | largest relative difference from the defaults |", "|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['chunk_size']} | {r['setting']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | |")
            continue
        ratio = base.get(r["chunk_size"])
        ratio = f"{ratio / r['seconds']:.2f}" if ratio else "-"
        difference = f"{r['difference']:.1e}" if "difference" in r else "-"
        lines.append(f"{head} {1e3 * r['seconds']:.2f} | {ratio} | {difference} |")
    return "\n".join(lines)


def parse_args(argv=None):
    gpu = on_gpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=65536 if gpu else 64)
    parser.add_argument("--heads", type=int, default=8 if gpu else 1)
    parser.add_argument("--dim", type=int, default=64 if gpu else 16)
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=[256, 1024] if gpu else [32])
    parser.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    parser.add_argument("--repeats", type=int, default=10 if gpu else 1)
    parser.add_argument("--max-minutes", type=float, help="start no new setting after this long (the rest are reported as not run)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here (after every setting)")
    args = parser.parse_args(argv)
    if args.seq <= max(args.chunk_sizes):
        parser.error(f"--seq must exceed every chunk size (sympow_attention runs a single chunk through the attention kernels); got {args.seq}")
    return args


def main(argv=None):
    args = parse_args(argv)
    title = f"chunked Triton path, forward + backward: seq {args.seq}, heads {args.heads}, dim {args.dim}, {args.dtype}, batch 1; median of {args.repeats}; {describe_machine()}"
    rows = sweep(args, title)
    if args.out:
        print(f"wrote {args.out}")
    print(f"\n{title}\n{table(rows)}")


if __name__ == "__main__":
    main()
