"""Time ops.sympow_attention's implementations and softmax flash attention side by side,
forward and forward + backward, with achieved TFLOP/s, compiled memory and speed-ups.

    python -m tools.benchmark --out benchmarks/gpu.json                 # on a GPU: the full sweep
    python -m tools.benchmark --p 4 --impls softmax triton attention    # p = 4 (the attention kernel)
    python -m tools.benchmark --impls attention chunked --chunk-sizes 64 128 256 512   # on a CPU

Defaults follow the backend. GPU: impls softmax (cuDNN), triton, chunked, attention; T = 1K..64K
at 64K tokens per batch; 8 heads, d = 64, bf16; chunk sizes 64..1024 for the chunked impls.
CPU: the attention and chunked forms, batch 1, 2 heads, float32 (the Triton interpreter is no
measure of speed). Every figure comes from one run on one machine. A case that fails (out of
memory, say) is reported as such and the sweep goes on; past --max-minutes no case starts.
The JSON is rewritten after every case. Each time is the median of --repeats calls after a
warm-up call that also compiles.

TFLOP/s counts the matmul FLOPs of each algorithm, as the FlashAttention papers do: causal
attention 2 B H T^2 d forward; the chunked form B H (2 T c d + 4 T D d), D = C(d + p - 1, p)
(the recurrent form the second term alone); forward + backward 3.5x forward.
"""

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

import ops
from ops.sympow.triton.launch import on_gpu

CHUNKED_IMPLS = ("chunked", "triton")
MODES = ("forward", "forward+backward")
IMPL_CHOICES = ("softmax", "attention", "recurrent", "chunked", "triton")


def make_inputs(batch, seq, heads, dim, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (batch, seq, heads, dim), dtype) for key in keys[:3])
    log_g = jnp.log(jax.random.uniform(keys[3], (batch, seq, heads), jnp.float32, 0.9, 0.999))
    return q, k, v, log_g


def attend_function(impl, p, chunk_size):
    """y = f(q, k, v, log_g) for one impl; softmax is flash attention (cuDNN on a GPU, XLA elsewhere)."""
    if impl == "softmax":
        implementation = "cudnn" if on_gpu() else "xla"
        return lambda q, k, v, log_g: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=implementation
        )
    return lambda q, k, v, log_g: ops.sympow_attention(q, k, v, log_g, p=p, chunk_size=chunk_size, impl=impl)


def timed_functions(impl, p, chunk_size):
    attend = attend_function(impl, p, chunk_size)

    def loss(q, k, v, log_g):
        return jnp.sum(attend(q, k, v, log_g).astype(jnp.float32))

    return dict(zip(MODES, (jax.jit(attend), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))))))


def uses_chunks(impl, seq, p, chunk_size) -> bool:
    """Whether this impl runs the chunked algorithm (as opposed to whole-sequence attention) here."""
    if impl == "chunked":
        return True
    return impl == "triton" and p == 2 and seq > chunk_size


def forward_flops(impl, batch, seq, heads, dim, p, chunk_size) -> float:
    state = 4 * seq * ops.embedding_size(dim, p) * dim  # building the states and querying them
    if impl == "recurrent":
        return batch * heads * state
    if uses_chunks(impl, seq, p, chunk_size):
        return batch * heads * (2 * seq * chunk_size * dim + state)
    return 2 * batch * heads * seq**2 * dim


def compiled_bytes(fn, inputs) -> int:
    """Temporary plus output bytes of the compiled program: what it needs beyond its inputs."""
    memory = fn.lower(*inputs).compile().memory_analysis()
    return memory.temp_size_in_bytes + memory.output_size_in_bytes


def timed(fn, inputs, repeats):
    """The median seconds of `repeats` calls after a warm-up call (which also compiles), and its outputs."""
    outputs = jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times), outputs


class TimeLimit:
    """Past --max-minutes a sweep starts no new case, so that a machine's time limit ends it with
    the table of what ran (the rest marked as not run) rather than with nothing."""

    NOT_RUN = "not run: --max-minutes reached"

    def __init__(self, minutes: float | None):
        self.end = math.inf if minutes is None else time.monotonic() + 60 * minutes

    def reached(self) -> bool:
        return time.monotonic() > self.end


def describe_error(error: Exception) -> str:
    """The error's type, first line and (for a traceback passed on, as from a host callback) last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    text = lines[0][:150] + (f" ... {lines[-1][:150]}" if len(lines) > 1 else "")
    return f"{type(error).__name__}: {text}".replace("|", "/")


def write_json(path: Path | None, args, rows, **extra) -> None:
    """The arguments and rows so far (written after every case: a killed run keeps what it measured)."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, **extra, rows=rows), indent=1))


def variants(impls, chunk_sizes):
    """(label, impl, chunk_size): the chunked impls once per chunk size, the others once."""
    for impl in impls:
        for chunk_size in chunk_sizes if impl in CHUNKED_IMPLS else [None]:
            yield (f"{impl}/{chunk_size}" if chunk_size else impl), impl, chunk_size


def measure(args, seq, impl, chunk_size, mode, fn, inputs) -> dict:
    """One row: seconds, TFLOP/s and bytes, or the error that stopped the case."""
    try:
        seconds, _ = timed(fn, inputs, args.repeats)
        memory = compiled_bytes(fn, inputs)
    except Exception as error:  # out of memory, an impl that does not support the shape: report, go on
        return dict(error=describe_error(error))
    batch = inputs[0].shape[0]
    flops = forward_flops(impl, batch, seq, args.heads, args.dim, args.p, chunk_size or ops.DEFAULT_CHUNK_SIZE)
    flops *= 3.5 if mode == "forward+backward" else 1
    return dict(seconds=seconds, tflops=flops / seconds / 1e12, bytes=memory)


def run(args, machine: str):
    dtype = jnp.dtype(args.dtype)
    rows = []
    limit = TimeLimit(args.max_minutes)
    cases = [(seq, *variant) for seq in args.seqs for variant in variants(args.impls, args.chunk_sizes)]
    for seq, label, impl, chunk_size in tqdm(cases, desc="benchmark"):
        batch = max(1, args.tokens // seq) if args.tokens else 1
        if limit.reached():
            rows += [dict(seq=seq, batch=batch, impl=label, mode=mode, error=TimeLimit.NOT_RUN) for mode in MODES]
        else:
            inputs = make_inputs(batch, seq, args.heads, args.dim, dtype)
            for mode, fn in timed_functions(impl, args.p, chunk_size).items():
                row = dict(seq=seq, batch=batch, impl=label, mode=mode)
                rows.append(row | measure(args, seq, impl, chunk_size, mode, fn, inputs))
        write_json(args.out, args, rows, machine=machine)
    return rows


def best_per_impl(rows):
    """For each (seq, mode, impl), the row of its fastest chunk size."""
    best = {}
    for row in rows:
        if "seconds" in row:
            key = (row["seq"], row["mode"], row["impl"].split("/")[0])
            if key not in best or row["seconds"] < best[key]["seconds"]:
                best[key] = row
    return best


def table(rows, baseline: str):
    """Markdown, one line per measurement in order of seq, with the speed-up over the baseline impl at that
    (seq, mode)."""
    base = {(r["seq"], r["mode"]): r["seconds"] for r in rows if r["impl"] == baseline and "seconds" in r}
    lines = [
        f"| seq | batch | mode | impl | ms | TFLOP/s | MiB | {baseline} time / this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["seq"]):
        head = f"| {r['seq']} | {r['batch']} | {r['mode']} | {r['impl']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | |")
            continue
        ratio = base.get((r["seq"], r["mode"]))
        ratio = f"{ratio / r['seconds']:.2f}" if ratio else "-"
        lines.append(f"{head} {1e3 * r['seconds']:.2f} | {r['tflops']:.3g} | {r['bytes'] / 2**20:.1f} | {ratio} |")
    return "\n".join(lines)


def plot(rows, path: Path, title: str):
    """Time against seq, forward and forward + backward, one line per impl at its best chunk size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_per_impl(rows)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, mode in zip(axes, ("forward", "forward+backward")):
        for impl in dict.fromkeys(impl for _, m, impl in best if m == mode):
            points = sorted((seq, row["seconds"] * 1e3) for (seq, m, i), row in best.items() if m == mode and i == impl)
            axis.plot(*zip(*points), marker="o", label=impl)
        axis.set(xscale="log", yscale="log", xlabel="sequence length T", title=mode)
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_xticks(
            sorted({r["seq"] for r in rows}), [str(s) for s in sorted({r["seq"] for r in rows})], rotation=45
        )
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("ms (chunked impls at their best chunk size)")
    axes[1].legend()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def describe_machine() -> str:
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    device = jax.devices()[0]
    return f"{cpu} ({os.cpu_count()} cores); jax {jax.__version__} on {device.platform} ({device.device_kind})"


def parse_args(argv=None):
    gpu = on_gpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=IMPL_CHOICES,
        default=["softmax", "triton", "chunked", "attention"] if gpu else ["attention", "chunked"],
    )
    parser.add_argument(
        "--seqs",
        nargs="+",
        type=int,
        default=[2**i for i in range(10, 17)] if gpu else [512, 1024, 2048, 4096, 8192, 16384],
    )
    parser.add_argument("--chunk-sizes", nargs="+", type=int, default=[64, 128, 256, 512, 1024] if gpu else [128])
    parser.add_argument(
        "--tokens",
        type=int,
        default=65536 if gpu else None,
        help="tokens per batch (batch = tokens // seq); default 64K on a GPU, batch 1 on a CPU",
    )
    parser.add_argument("--heads", type=int, default=8 if gpu else 2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--p", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16" if gpu else "float32")
    parser.add_argument("--repeats", type=int, default=10 if gpu else 3)
    parser.add_argument(
        "--max-minutes", type=float, help="start no new case after this long (the rest are reported as not run)"
    )
    parser.add_argument(
        "--baseline", help="impl the speed-ups are relative to (default: softmax if run, else the first impl)"
    )
    parser.add_argument("--out", type=Path, help="write the rows as JSON here, and the plot next to it as .png")
    args = parser.parse_args(argv)
    labels = [label for label, _, _ in variants(args.impls, args.chunk_sizes)]
    args.baseline = args.baseline or ("softmax" if "softmax" in args.impls else labels[0])
    if args.baseline not in labels:
        parser.error(f"--baseline must be one of the measured impls {labels}; got {args.baseline!r}")
    if args.p % 2 or args.p <= 0:
        parser.error(f"--p must be a positive even integer; got {args.p}")
    return args


def main(argv=None):
    args = parse_args(argv)
    machine = describe_machine()
    rows = run(args, machine)
    batch = f"{args.tokens} tokens per batch" if args.tokens else "batch 1"
    shape = f"{batch}, heads {args.heads}, dim {args.dim}, p {args.p}, {args.dtype}, gated"
    title = f"{shape}; median of {args.repeats}; {machine}"
    if args.out:
        written = [args.out]
        if best_per_impl(rows):  # no plot when no case ran
            plot(rows, args.out.with_suffix(".png"), title)
            written.append(args.out.with_suffix(".png"))
        print("wrote", " and ".join(map(str, written)))
    print(f"\n{title}")
    print(table(rows, args.baseline))


if __name__ == "__main__":
    main()
