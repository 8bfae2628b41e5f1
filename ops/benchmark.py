"""Time ops.sympow_attention's implementations side by side, forward and forward + backward.

    python -m ops.benchmark --impls attention chunked --chunk-sizes 64 128 256

Every figure in one table comes from one run on one machine; ratios are to the first impl.
Medians of --repeats timed calls after a warm-up call (which also compiles).
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

import ops


def make_inputs(batch, seq, heads, dim, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (batch, seq, heads, dim), dtype) for key in keys[:3])
    log_g = jnp.log(jax.random.uniform(keys[3], (batch, seq, heads), dtype, 0.9, 0.999))
    return q, k, v, log_g


def timed_functions(impl, p, chunk_size):
    def forward(q, k, v, log_g):
        return ops.sympow_attention(q, k, v, log_g, p=p, chunk_size=chunk_size, impl=impl)

    def loss(q, k, v, log_g):
        return jnp.sum(forward(q, k, v, log_g).astype(jnp.float32))

    return {"forward": jax.jit(forward), "forward+backward": jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))}


def median_seconds(fn, inputs, repeats):
    jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def variants(impls, chunk_sizes):
    """(label, impl, chunk_size): the chunked form once per chunk size, the others once."""
    for impl in impls:
        for chunk_size in chunk_sizes if impl == "chunked" else [None]:
            yield (f"{impl}/{chunk_size}" if chunk_size else impl), impl, chunk_size


def describe_machine() -> str:
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    device = jax.devices()[0]
    return f"{cpu} ({os.cpu_count()} cores); jax {jax.__version__} on {device.platform} ({device.device_kind})"


def run(args):
    dtype = jnp.dtype(args.dtype)
    rows = []
    cases = [(seq, *variant) for seq in args.seqs for variant in variants(args.impls, args.chunk_sizes)]
    for seq, label, impl, chunk_size in tqdm(cases, desc="benchmark"):
        inputs = make_inputs(args.batch, seq, args.heads, args.dim, dtype)
        for mode, fn in timed_functions(impl, args.p, chunk_size).items():
            rows.append(dict(seq=seq, impl=label, mode=mode, seconds=median_seconds(fn, inputs, args.repeats)))
    return rows


def table(rows):
    """Markdown table: one line per (seq, mode), one column per impl, ratio to the first impl."""
    labels = list(dict.fromkeys(r["impl"] for r in rows))
    lines = ["| seq | mode | " + " | ".join(f"{label} (ms)" for label in labels) + " | " + " | ".join(f"{labels[0]} / {label}" for label in labels[1:]) + " |"]
    lines.append("|" + "---|" * (2 + 2 * len(labels) - 1))
    for seq, mode in dict.fromkeys((r["seq"], r["mode"]) for r in rows):
        seconds = {r["impl"]: r["seconds"] for r in rows if r["seq"] == seq and r["mode"] == mode}
        base = seconds[labels[0]]
        lines.append(
            f"| {seq} | {mode} | "
            + " | ".join(f"{1e3 * seconds[label]:.1f}" for label in labels)
            + " | "
            + " | ".join(f"{base / seconds[label]:.2f}" for label in labels[1:])
            + " |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", default=["attention", "chunked"], choices=[i for i in ops.IMPLS if i != "auto"])
    parser.add_argument("--seqs", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=[128])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--p", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the rows and the machine as JSON here")
    args = parser.parse_args()

    rows = run(args)
    machine = describe_machine()
    if args.out:
        args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, machine=machine, rows=rows), indent=1))
    print(f"\nbatch {args.batch}, heads {args.heads}, dim {args.dim}, p {args.p}, {args.dtype}, gated; median of {args.repeats}; {machine}")
    print(table(rows))


if __name__ == "__main__":
    main()
