"""One command that settles the Triton kernels on a GPU within a deadline, in order of value:

    python -m tools.gpu_check --out runs/gpu           # on the GPU machine: bash scripts/gpu_checks.sh
    python -m tools.gpu_check --dry-run --out runs/dry # on a CPU: tiny shapes, Triton's interpreter

1. versions, then one forward + backward launch of each kernel family (chunked p = 2, flash
   p = 2 and p = 4) at a small shape against the pure-JAX form; if one raises, no later stage
   starts (the error is printed); then each family with two query heads to a key/value head
   (an error there is printed, and the later stages still run);
2. the bf16 precision rule (docs/kernels.md) on the cases most likely to fail first;
3. forward + backward at T = 65536, 16384 and 4096 (batch 1, 8 heads, d = 64, p = 2, bf16,
   gated): the Triton path, the pure-JAX chunked form, cuDNN flash attention and the authors'
   `retention` kernels (PyTorch), side by side;
4. p = 4 at 16K: the flash-style kernels against cuDNN;
5. with time left, the tuning candidates (tools.tune) most likely to win.

No stage or case starts after --minutes (6: with the case running then, the command ends within
about 7); results.json is rewritten after every stage, and a table of everything is printed
last. The dry run runs every stage at toy sizes in float32 (the interpreter's only dtype),
without torch (its kernels need CUDA); the suite runs it, so the script cannot rot unseen. JAX
must not take the whole GPU (XLA_PYTHON_CLIENT_PREALLOCATE=false) for torch to run beside it;
scripts/gpu_checks.sh sets that.
"""

import argparse
import dataclasses
import importlib.metadata
import json
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ops
from ops.sympow.naive import attention_form
from ops.sympow.triton import chunked as chunked_kernels
from ops.sympow.triton.launch import STAGES, LaunchOptions, on_gpu
from tools import tune
from tools.benchmark import describe_error, describe_machine, make_inputs, timed, timed_functions

# Float32 round-off of unit-size inputs, the rule's floor for the float32 dry run.
FLOAT32_ROUNDOFF = 2e-6


@dataclasses.dataclass(frozen=True)
class Shapes:
    dtype: str
    launch: tuple  # (seq, heads, dim, chunk)
    precision: tuple  # (p, seq, dim, chunk, gamma), most likely to fail first
    speed_seqs: tuple
    speed_heads: int
    speed_dim: int
    triton_chunks: tuple
    jax_chunk: int
    retention_chunk: int
    p4_seq: int
    repeats: int
    tune_args: tuple


GPU = Shapes(
    dtype="bfloat16",
    launch=(300, 2, 64, 128),
    precision=((2, 500, 64, 128, 0.01), (4, 500, 64, 128, 0.01), (2, 2000, 64, 128, None), (2, 4097, 64, 256, 0.9)),
    speed_seqs=(65536, 16384, 4096),
    speed_heads=8,
    speed_dim=64,
    triton_chunks=(256, 1024),
    jax_chunk=1024,
    retention_chunk=1024,  # their published H100 figure: 16.8 ms at 64K, chunk 1024
    p4_seq=16384,
    repeats=10,
    tune_args=("--chunk-sizes", "256"),
)
DRY = Shapes(
    dtype="float32",
    launch=(40, 1, 16, 16),
    precision=((2, 40, 16, 16, 0.5), (4, 20, 16, 16, 0.5)),
    speed_seqs=(64,),
    speed_heads=1,
    speed_dim=16,
    triton_chunks=(16,),
    jax_chunk=16,
    retention_chunk=16,
    p4_seq=32,
    repeats=1,
    tune_args=("--kernels", "attention", "--seq", "32", "--heads", "1", "--dim", "16"),
)


class Deadline:
    def __init__(self, minutes: float):
        self.end = time.monotonic() + 60 * minutes

    def minutes_left(self) -> float:
        return max(0.0, (self.end - time.monotonic()) / 60)


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max(max |expected|, 1): inputs are of unit size."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1.0))


def inputs(seq, heads, dim, gamma, seed=0):
    """float64 q, k, v (leaning towards one direction per head, as the tests' inputs) and log-gates."""
    keys = jax.random.split(jax.random.key(seed), 5)
    direction = jax.random.normal(keys[4], (heads, dim), jnp.float64)
    q, k = (direction + 0.5 * jax.random.normal(key, (1, seq, heads, dim), jnp.float64) for key in keys[:2])
    v = jax.random.normal(keys[2], (1, seq, heads, dim), jnp.float64)
    exponent = jax.random.uniform(keys[3], (1, seq, heads), jnp.float64, 0.5, 2.0)
    log_g = exponent * math.log(gamma if gamma else 1.0)
    return q, k, v, log_g


def output_and_gradients(attend, q, k, v, log_g):
    y, pullback = jax.vjp(attend, q, k, v, log_g)
    return (
        y,
        *pullback(
            jax.grad(lambda y: jnp.sum(jnp.sin(3 * y.astype(jnp.float32 if y.dtype != jnp.float64 else y.dtype))))(y)
        ),
    )


def errors(impl, p, chunk, reference, as_dtype, q, k, v, log_g, gated):
    attend = jax.jit(
        lambda q, k, v, g: ops.sympow_attention(q, k, v, g if gated else None, p=p, chunk_size=chunk, impl=impl)
    )
    got = output_and_gradients(attend, *(a.astype(as_dtype) for a in (q, k, v)), log_g.astype(jnp.float32))
    return [relative_error(a, b) for a, b in zip(got, reference)]


def stage_errors(kernel_stages, chunk, reference, as_dtype, q, k, v, log_g):
    """errors() of the chunked path (p = 2, gated) with only these stages as kernels."""
    options = LaunchOptions(kernel_stages=kernel_stages)
    scale = 1 / math.sqrt(q.shape[-1])
    attend = jax.jit(lambda q, k, v, g: chunked_kernels.chunked(q, k, v, g, scale, chunk, options)[0])
    got = output_and_gradients(attend, *(a.astype(as_dtype) for a in (q, k, v)), log_g.astype(jnp.float32))
    return [relative_error(a, b) for a, b in zip(got, reference)]


def precision_row(name, p, seq, heads, dim, chunk, gamma, dtype, floor, kernel_stages=STAGES, group=1) -> dict:
    """The kernels' errors in y, dq, dk, dv, d log_g against float64, beside the pure-JAX form's
    in the same dtype; within the rule: at most twice it (or floor). kernel_stages: for the
    chunked kernels (p = 2, gated), only these stages as kernels. group: query heads per
    key/value head (heads x group query heads)."""
    q, k, v, log_g = inputs(seq, heads * group, dim, gamma, seed=seq + dim)
    k, v, log_g = (a[:, :, :heads] for a in (k, v, log_g))
    scale = 1 / math.sqrt(dim)
    gated = gamma is not None
    reference = output_and_gradients(
        lambda q, k, v, g: attention_form(q, k, v, g if gated else None, p, scale), q, k, v, log_g
    )
    if kernel_stages == STAGES:
        kernel = errors("triton", p, chunk, reference, jnp.dtype(dtype), q, k, v, log_g, gated)
    else:
        kernel = stage_errors(kernel_stages, chunk, reference, jnp.dtype(dtype), q, k, v, log_g)
    plain = errors("chunked" if p == 2 else "attention", p, chunk, reference, jnp.dtype(dtype), q, k, v, log_g, gated)
    ratios = {
        n: (a / b if b else math.inf if a else 1.0) for n, a, b in zip(("y", "dq", "dk", "dv", "dlog_g"), kernel, plain)
    }
    ok = all(a <= max(2 * b, floor) for a, b in zip(kernel, plain))
    case = f"{name} p={p} T={seq} d={dim} chunk={chunk} gamma={gamma}" + (
        f" heads {heads * group}/{heads}" if group > 1 else ""
    )
    return dict(
        case=case, ok=ok, result="error ratio kernel/pure JAX: " + ", ".join(f"{n} {r:.2f}" for n, r in ratios.items())
    )


def rule_floor(shapes: Shapes) -> float:
    return FLOAT32_ROUNDOFF if shapes.dtype == "float32" else 0.0


def stage_launch(shapes: Shapes) -> list[dict]:
    """Each kernel family once, forward + backward: past one chunk (the chunked kernels, both
    stages and each alone, so that LaunchOptions.kernel_stages can take those that pass) and
    within one (the flash-style kernels, p = 2 and 4); then both with two query heads to a
    key/value head."""
    seq, heads, dim, chunk = shapes.launch
    rows = []
    cases = [("chunked kernels", 2, seq, STAGES, 1)]
    cases += [(f"chunked, {stage} stage alone as kernels", 2, seq, (stage,), 1) for stage in STAGES]
    cases += [("flash kernels", 2, chunk, STAGES, 1), ("flash kernels", 4, chunk, STAGES, 1)]
    cases += [("chunked kernels, grouped", 2, seq, STAGES, 2), ("flash kernels, grouped", 2, chunk, STAGES, 2)]
    for name, p, length, stages, group in cases:
        try:
            floor = rule_floor(shapes)
            row = precision_row(name, p, length, heads, dim, chunk, 0.9, shapes.dtype, floor, stages, group)
            rows.append(row)
        except Exception as error:  # a kernel that does not compile or launch: say so, and stop (not for groups)
            rows.append(dict(case=f"{name} p={p}", ok=False, error=group == 1, result=describe_error(error)))
    return rows


def stage_precision(shapes: Shapes, deadline: Deadline) -> list[dict]:
    rows = []
    floor = rule_floor(shapes)
    for p, seq, dim, chunk, gamma in shapes.precision:
        if deadline.minutes_left() <= 0:
            rows.append(dict(case=f"p={p} T={seq}", ok=None, result="not run: deadline"))
            continue
        rows.append(precision_row("rule", p, seq, 4, dim, chunk, gamma, shapes.dtype, floor))
    return rows


def jax_time(impl, p, chunk, seq, shapes: Shapes) -> float:
    q, k, v, log_g = make_inputs(1, seq, shapes.speed_heads, shapes.speed_dim, jnp.dtype(shapes.dtype))
    seconds, _ = timed(timed_functions(impl, p, chunk)["forward+backward"], (q, k, v, log_g), shapes.repeats)
    return seconds


def retention_time(seq, shapes: Shapes) -> float:
    """The authors' power_retention (PyTorch + Triton), forward + backward on the same problem:
    median of CUDA-event timings after a warm-up."""
    import retention
    import torch

    def tensor(*shape, low=None):
        if low is None:
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return torch.log(torch.empty(*shape, device="cuda").uniform_(low, 0.999)).requires_grad_()

    q, k, v = (tensor(1, seq, shapes.speed_heads, shapes.speed_dim) for _ in range(3))
    log_g = tensor(1, seq, shapes.speed_heads, low=0.9)

    def step():
        retention.power_retention(q, k, v, log_g, deg=2, chunk_size=shapes.retention_chunk).float().sum().backward()

    step()
    times = []
    for _ in range(shapes.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def speed_rows(seqs, p, contenders, deadline: Deadline) -> list[dict]:
    """One row per (seq, contender): forward + backward milliseconds, or why not."""
    rows = []
    for seq in seqs:
        for name, measure in contenders:
            case = f"p={p} T={seq} {name}"
            if deadline.minutes_left() <= 0:
                rows.append(dict(case=case, ok=None, result="not run: deadline"))
                continue
            try:
                ms = 1e3 * measure(seq)
                rows.append(dict(case=case, ok=True, ms=ms, result=f"{ms:.2f} ms forward + backward"))
            except Exception as error:  # out of memory, a missing package: report and go on
                rows.append(dict(case=case, ok=False, result=describe_error(error)))
    return rows


def stage_speed(shapes: Shapes, deadline: Deadline, dry_run: bool) -> list[dict]:
    contenders = [(f"triton/{c}", lambda seq, c=c: jax_time("triton", 2, c, seq, shapes)) for c in shapes.triton_chunks]
    contenders += [(f"chunked/{shapes.jax_chunk}", lambda seq: jax_time("chunked", 2, shapes.jax_chunk, seq, shapes))]
    contenders += [
        ("softmax (cuDNN)" if on_gpu() else "softmax (XLA)", lambda seq: jax_time("softmax", 2, None, seq, shapes))
    ]
    rows = speed_rows(shapes.speed_seqs, 2, contenders, deadline)
    if dry_run:
        rows.append(
            dict(
                case=f"retention/{shapes.retention_chunk}",
                ok=None,
                result="skipped in the dry run: its kernels need torch with CUDA",
            )
        )
    else:
        rows += speed_rows(
            shapes.speed_seqs,
            2,
            [(f"retention/{shapes.retention_chunk}", lambda seq: retention_time(seq, shapes))],
            deadline,
        )
    return rows


def stage_p4(shapes: Shapes, deadline: Deadline) -> list[dict]:
    contenders = [("triton (flash)", lambda seq: jax_time("triton", 4, None, seq, shapes))]
    contenders += [
        ("softmax (cuDNN)" if on_gpu() else "softmax (XLA)", lambda seq: jax_time("softmax", 4, None, seq, shapes))
    ]
    return speed_rows((shapes.p4_seq,), 4, contenders, deadline)


def stage_tune(shapes: Shapes, deadline: Deadline, out: Path) -> list[dict]:
    minutes = deadline.minutes_left()
    if minutes <= 0:
        return [dict(case="tune", ok=None, result="not run: deadline")]
    tune.main([*shapes.tune_args, "--max-minutes", f"{minutes:.2f}", "--out", str(out / "tune.json")])
    return [dict(case="tune", ok=True, result=f"{out / 'tune.json'} (its table is printed above)")]


def versions() -> dict:
    found = {}
    for name in ("jax", "jaxlib", "triton", "jax-triton", "numpy", "torch", "retention"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def table(results: dict) -> str:
    lines = ["| stage | case | ok | result |", "|---|---|---|---|"]
    for stage, rows in results["stages"].items():
        for row in rows:
            ok = {True: "yes", False: "NO", None: "-"}[row["ok"]]
            lines.append(f"| {stage} | {row['case']} | {ok} | {row['result']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes in Triton's interpreter, float32, no torch")
    parser.add_argument(
        "--minutes", type=float, default=6.0, help="no stage starts after this long (the case running then still ends)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/gpu"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    jax.config.update("jax_enable_x64", True)  # the float64 references
    shapes, deadline = (DRY if args.dry_run else GPU), Deadline(args.minutes)
    args.out.mkdir(parents=True, exist_ok=True)
    results = dict(
        machine=describe_machine(),
        versions=versions(),
        devices=[str(d) for d in jax.devices()],
        dry_run=args.dry_run,
        stages={},
    )
    print(json.dumps({k: results[k] for k in ("machine", "versions", "devices")}, indent=1), flush=True)
    stages = [
        ("launch", lambda: stage_launch(shapes)),
        ("precision", lambda: stage_precision(shapes, deadline)),
        ("speed", lambda: stage_speed(shapes, deadline, args.dry_run)),
        ("p4", lambda: stage_p4(shapes, deadline)),
        ("tune", lambda: stage_tune(shapes, deadline, args.out)),
    ]
    for name, stage in stages:
        if any(row.get("error") for row in results["stages"].get("launch", [])):
            rows = [dict(case=name, ok=None, result="not run: a kernel family failed to launch")]
        elif deadline.minutes_left() <= 0:
            rows = [dict(case=name, ok=None, result="not run: deadline")]
        else:
            print(f"== {name} ({deadline.minutes_left():.1f} minutes left)", flush=True)
            try:
                rows = stage()
            except Exception as error:
                rows = [dict(case=name, ok=False, error=True, result=describe_error(error))]
        results["stages"][name] = rows
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    failed = [row for rows in results["stages"].values() for row in rows if row["ok"] is False]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
