"""Choose the Triton kernels' tilings by timing them, forward + backward: the defaults first,
then one kernel's tiling (or the chunked scans' value columns) changed at a time, then every
change that beat the defaults together, all in one run.

    python -m tools.tune --out runs/tune.json  # on a GPU: the chunked kernels, p = 2, T = 65536, 8 heads, d = 64, bf16
    python -m tools.tune --kernels attention     # the flash-style kernels, p = 4, T = 16384
    python -m tools.tune --seq 64 --heads 1 --dim 16 --chunk-sizes 32   # on a CPU: the interpreter

Candidates are the tilings that compiled for sm_90 at d = 64 in bf16 (the flash-style kernels
at p = 4), as jax-triton compiles them, with at most 32 bytes a thread of ptxas spills (triton
3.6 and 3.7); one that does not fit a shape here is reported as an error and the sweep goes on.
Every setting's outputs (y, dq, dk, dv and the gates' gradient) are compared with the defaults':
a tiling that computes something else shows there. On a CPU the same tilings run in Triton's
interpreter (a check that results do not depend on the tiling, not a measure of speed).
"""

import argparse
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ops.sympow.gate import exact_cumulative_gate
from ops.sympow.triton import attention, chunked, chunked_plan
from ops.sympow.triton.attention import (
    power_attention_backward_keys,
    power_attention_backward_queries,
    power_attention_forward,
)
from ops.sympow.triton.chunk_kernels import power_chunk_backward_keys, power_chunk_backward_queries, power_chunk_forward
from ops.sympow.triton.launch import LaunchOptions, Tiling, on_gpu
from ops.sympow.triton.state_kernels import power_state_scan, power_state_scan_backward
from tools.benchmark import TimeLimit, describe_error, describe_machine, make_inputs, timed, write_json

# Tiling(query rows, key rows, warps, pipeline stages). The scans step over BLOCK_N keys
# (forward) or BLOCK_M queries (backward) a time; their other row count, unused, is set alike.
CHUNKED_CANDIDATES = {
    power_state_scan: [Tiling(n, n, w) for n in (32, 64, 128) for w in (4, 8)],
    # 128 rows with 4 warps spilled 44 bytes and more but for 32 keys a tile.
    power_chunk_forward: [Tiling(64, n, w) for n in (32, 64) for w in (4, 8)]
    + [Tiling(128, n, 8) for n in (32, 64, 128)]
    + [Tiling(128, 32, 4)],
    power_chunk_backward_queries: [
        Tiling(32, 32, 8, 2),
        Tiling(64, 32, 8, 2),
        Tiling(64, 32, 4, 2),
        Tiling(64, 32, 8, 3),
        Tiling(128, 32, 8, 3),
    ],
    power_state_scan_backward: [Tiling(m, m, w) for m in (32, 64, 128) for w in (4, 8)],
    # 64 x 64 spilled 168 bytes and more.
    power_chunk_backward_keys: [
        Tiling(32, 32, 8, 2),
        Tiling(64, 32, 8, 2),
        Tiling(64, 32, 4, 3),
        Tiling(32, 64, 8, 2),
        Tiling(32, 32, 8, 3),
    ],
}
# The forward and backward queries kernels hold BLOCK_M queries and step over BLOCK_N keys; the
# backward keys kernel holds BLOCK_N keys and steps over BLOCK_M queries.
ATTENTION_CANDIDATES = {
    # 128 x 64 with 4 warps spilled 96 bytes and more, 128 x 128 with 8 warps and 3 stages 320 (triton 3.7).
    power_attention_forward: [
        Tiling(128, 32, 8),
        Tiling(128, 64, 8, 2),
        Tiling(128, 64, 8, 4),
        Tiling(128, 128, 8, 2),
        Tiling(128, 32, 4),
        Tiling(64, 64, 4),
        Tiling(64, 128, 4),
    ],
    # 64 queries against 128 keys spilled 984 bytes and more, 32 against 128 with 4 warps 340.
    power_attention_backward_keys: [
        Tiling(64, 32, 8, 2),
        Tiling(32, 64, 4),
        Tiling(32, 64, 8),
        Tiling(16, 64, 8),
        Tiling(64, 64, 4),
        Tiling(32, 128, 8),
        Tiling(16, 128, 8),
    ],
    # 128 queries against 64 keys with 4 warps spilled 764 bytes and more.
    power_attention_backward_queries: [
        Tiling(64, 32, 8, 2),
        Tiling(128, 16, 8),
        Tiling(128, 32, 8),
        Tiling(128, 64, 8),
        Tiling(64, 64, 8),
        Tiling(64, 64, 4),
        Tiling(32, 64, 8),
    ],
}
SCAN_VALUE_COLUMNS = LaunchOptions().scan_value_columns  # the default
SCAN_VALUE_COLUMN_CANDIDATES = (16, 32, 64)
# Largest relative difference from the defaults' outputs that still counts as the same result:
# bf16 outputs summed in another order differ by an ulp (2^-8 relative), a wrong tile by O(1).
SAME_RESULT = 1e-2


def describe(tiling: Tiling) -> str:
    return f"{tiling.query_rows}x{tiling.key_rows} rows, {tiling.num_warps} warps, {tiling.num_stages} stages"


def chunked_forward_backward(scale: float, chunk_size: int, options: LaunchOptions):
    """(y, dq, dk, dv, dL) of the chunked kernels launched with these options, jitted."""

    def run(q, k, v, log_g, dy):
        L = chunked_plan.chunk_gates(log_g, chunk_size)
        y, log_normaliser, S, z = chunked.chunked_forward(q, k, v, L, scale, chunk_size, options)
        return (y, *chunked.chunked_backward(q, k, v, L, y, log_normaliser, S, z, dy, scale, chunk_size, options))

    return jax.jit(run)


def attention_forward_backward(p: int, scale: float, options: LaunchOptions):
    """(y, dq, dk, dv, dG) of the flash-style kernels launched with these options, jitted."""

    def run(q, k, v, log_g, dy):
        gate = exact_cumulative_gate(log_g)
        y, log_normaliser = attention.attention_forward(q, k, v, gate, p, scale, True, options)
        return (y, *attention.attention_backward(q, k, v, gate, y, log_normaliser, dy, p, scale, True, options))

    return jax.jit(run)


def tiling_changes(candidates: dict, defaults: dict, fits=lambda tiling: True):
    """(label, launch options) for each candidate that differs from its kernel's default and fits."""
    for kernel, kernel_candidates in candidates.items():
        for tiling in kernel_candidates:
            if tiling != defaults[kernel] and fits(tiling):
                yield f"{kernel.__name__}: {describe(tiling)}", LaunchOptions(overrides=((kernel, tiling),))


def chunked_changes(chunk_size: int, defaults: dict):
    """The chunked kernels' candidates whose tiles fit whole in a chunk, and the scans' value columns."""
    yield from tiling_changes(
        CHUNKED_CANDIDATES, defaults, lambda t: chunk_size % t.query_rows == 0 and chunk_size % t.key_rows == 0
    )
    for columns in SCAN_VALUE_COLUMN_CANDIDATES:
        if columns != SCAN_VALUE_COLUMNS:
            yield f"both scans: {columns} value columns", LaunchOptions(scan_value_columns=columns)


def cases(args, dtype):
    """(label, options -> jitted forward + backward, {setting label: options}) for each case to
    sweep: one per chunk size for the chunked kernels, one for the flash-style kernels."""
    scale = 1 / math.sqrt(args.dim)
    if args.kernels == "attention":
        defaults = LaunchOptions().tilings(
            attention.gpu_tilings, args.dim, dtype.itemsize
        )  # the interpreter's on a CPU
        yield (
            f"p = {args.p}",
            functools.partial(attention_forward_backward, args.p, scale),
            dict(tiling_changes(ATTENTION_CANDIDATES, defaults)),
        )
        return
    defaults = LaunchOptions().tilings(chunked_plan.gpu_tilings, args.dim, dtype.itemsize)
    for chunk_size in args.chunk_sizes:
        yield (
            f"chunk {chunk_size}",
            functools.partial(chunked_forward_backward, scale, chunk_size),
            dict(chunked_changes(chunk_size, defaults)),
        )


def largest_difference(outputs, reference) -> float:
    """max over the outputs of max |a - b| / max |b|."""
    pairs = ((np.asarray(a, np.float32), np.asarray(b, np.float32)) for a, b in zip(outputs, reference))
    return max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)) for a, b in pairs)


def measure(row: dict, forward_backward, inputs, reference, repeats: int, limit: TimeLimit):
    """(row, outputs): the row with seconds and the outputs' difference from the reference's (if
    any), or with the error that stopped the setting (outputs None)."""
    if limit.reached():
        return row | dict(error=TimeLimit.NOT_RUN), None
    try:
        seconds, outputs = timed(forward_backward, inputs, repeats)
    except Exception as error:  # a tiling that does not compile or fit here: report it, go on
        return row | dict(error=describe_error(error)), None
    difference = {} if reference is None else dict(difference=largest_difference(outputs, reference))
    return row | dict(seconds=seconds) | difference, outputs


def combined(rows, settings: dict) -> LaunchOptions | None:
    """Every single change that beat the defaults in this case (the fastest per kernel), together."""
    base = next(r["seconds"] for r in rows if r["setting"] == "defaults")
    winners = {}
    for row in rows:
        if row.get("difference", math.inf) < SAME_RESULT and row["seconds"] < base:
            kernel = row["setting"].split(":")[0]
            if kernel not in winners or row["seconds"] < winners[kernel]["seconds"]:
                winners[kernel] = row
    if not winners:
        return None
    changes = [settings[row["setting"]] for row in winners.values()]
    overrides = tuple(pair for change in changes for pair in change.overrides)
    columns = next(
        (c.scan_value_columns for c in changes if c.scan_value_columns != SCAN_VALUE_COLUMNS), SCAN_VALUE_COLUMNS
    )
    return LaunchOptions(overrides=overrides, scan_value_columns=columns)


def sweep(args, title: str) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    q, k, v, log_g = make_inputs(1, args.seq, args.heads, args.dim, dtype)
    dy = jax.random.normal(jax.random.key(1), v.shape, dtype)
    inputs = (q, k, v, log_g, dy)
    rows, limit = [], TimeLimit(args.max_minutes)
    for case, forward_backward, settings in cases(args, dtype):

        def run(setting: str, options: LaunchOptions, reference, case=case, forward_backward=forward_backward):
            row = dict(case=case, setting=setting)
            return measure(row, forward_backward(options), inputs, reference, args.repeats, limit)

        defaults_row, reference = run("defaults", LaunchOptions(), None)
        case_rows = [defaults_row]
        for label, options in tqdm(settings.items(), desc=case):
            case_rows.append(run(label, options, reference)[0])
            write_json(args.out, args, rows + case_rows, title=title)
        best = combined(case_rows, settings) if reference is not None else None
        if best:
            case_rows.append(run("all faster changes together", best, reference)[0])
        rows += case_rows
        write_json(args.out, args, rows, title=title)
    return rows


def table(rows) -> str:
    base = {r["case"]: r["seconds"] for r in rows if r["setting"] == "defaults" and "seconds" in r}
    lines = [
        "| case | setting | ms | defaults / this | largest relative difference from the defaults |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['case']} | {r['setting']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | |")
            continue
        ratio = base.get(r["case"])
        ratio = f"{ratio / r['seconds']:.2f}" if ratio else "-"
        difference = f"{r['difference']:.1e}" if "difference" in r else "-"
        lines.append(f"{head} {1e3 * r['seconds']:.2f} | {ratio} | {difference} |")
    return "\n".join(lines)


def parse_args(argv=None):
    gpu = on_gpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--kernels",
        choices=("chunked", "attention"),
        default="chunked",
        help="the chunked kernels (p = 2) or the flash-style ones",
    )
    parser.add_argument(
        "--p", type=int, help="the power: 4 by default for the flash-style kernels; the chunked ones take 2 only"
    )
    parser.add_argument(
        "--seq", type=int, help="default: 65536 for the chunked kernels, 16384 for the flash-style ones (64 on a CPU)"
    )
    parser.add_argument("--heads", type=int, default=8 if gpu else 1)
    parser.add_argument("--dim", type=int, default=64 if gpu else 16)
    parser.add_argument(
        "--chunk-sizes", nargs="+", type=int, default=[256, 1024] if gpu else [32], help="for the chunked kernels"
    )
    parser.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    parser.add_argument("--repeats", type=int, default=10 if gpu else 1)
    parser.add_argument(
        "--max-minutes", type=float, help="start no new setting after this long (the rest are reported as not run)"
    )
    parser.add_argument("--out", type=Path, help="write the rows as JSON here (after every setting)")
    args = parser.parse_args(argv)
    if args.seq is None:
        args.seq = (16384 if args.kernels == "attention" else 65536) if gpu else 64
    if args.p is None:
        args.p = 4 if args.kernels == "attention" else 2
    if args.p <= 0 or args.p % 2 or (args.kernels == "chunked" and args.p != 2):
        parser.error(f"--p must be a positive even integer, and 2 for the chunked kernels; got {args.p}")
    if args.kernels == "chunked" and args.seq <= max(args.chunk_sizes):
        parser.error(
            "--seq must exceed every chunk size (sympow_attention runs a single chunk through the attention "
            f"kernels); got {args.seq}"
        )
    return args


def main(argv=None):
    args = parse_args(argv)
    title = (
        f"{args.kernels} Triton kernels, forward + backward: p {args.p}, seq {args.seq}, heads {args.heads}, "
        f"dim {args.dim}, {args.dtype}, batch 1;"
        f" median of {args.repeats}; {describe_machine()}"
    )
    rows = sweep(args, title)
    if args.out:
        print(f"wrote {args.out}")
    print(f"\n{title}\n{table(rows)}")


if __name__ == "__main__":
    main()
