"""Train a (conformal) symmetric power transformer, or the softmax baseline.

    python train.py                         # tiny conformal model on the embedded corpus, CPU, a few minutes
    python train.py --attention sympow --context 1024 --preset 124m --data gs://longcrawl64 --out runs/x

Running the same command again resumes from the last checkpoint in --out, exactly. On several
processes (hosts, or `python -m sympow.launch` on one machine) every process runs this same
script with --coordinator, --num-processes and --process-id (sympow/distributed.py).

Read it in order: the flags; the optimizer and the loss; `make_train_step`, one jitted update;
`set_up`, a new run or the last checkpoint's; `data_parallel`, the run placed on every device;
`Reporter`, which reads a step's loss (one step late), stops on a NaN and writes the metrics;
and `main`'s loop: a batch read ahead, a step, the report, the checkpoint.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

import sympow
from sympow import checkpoint, data, distributed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", default="conformal", choices=sympow.ATTENTIONS)
    parser.add_argument("--p", type=int, default=2, help="power of the symmetric power attention")
    parser.add_argument("--context", type=int, default=256, help="training context (tokens per example)")
    parser.add_argument("--preset", default="tiny", choices=tuple(sympow.PRESETS))
    parser.add_argument("--steps", type=int, default=200, help="optimizer updates")
    parser.add_argument("--tokens-per-update", type=int, default=4096, help="held fixed across contexts (paper: 2^19)")
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="examples per forward pass (default: the whole update)"
    )
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument(
        "--warmup", type=int, default=None, help="linear warmup steps (default: 10 for tiny, 200 otherwise)"
    )
    parser.add_argument("--clip", type=float, default=1.0, help="global gradient norm clip")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--chunk-size", type=int, default=None, help="chunk size of the sympow chunked form")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="compute dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    parser.add_argument(
        "--data", default="embedded", help='"embedded", or a folder / fsspec URL holding train.zarr and heldout.zarr'
    )
    parser.add_argument("--out", type=Path, default=Path("runs/default"))
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    distributed.add_flags(parser)
    return parser.parse_args(argv)


def model_config(args) -> sympow.ModelConfig:
    overrides = dict(attention=args.attention, p=args.p)
    if args.chunk_size:
        overrides["chunk_size"] = args.chunk_size
    return sympow.preset(args.preset, **overrides)


def optimizer(args) -> optax.GradientTransformation:
    """AdamW with a linear warmup to a constant rate (the paper trains at a constant 6e-4) and norm
    clipping. Weight decay, when asked for, shrinks matrices only: LayerNorm scales and biases
    (vectors) set scales and offsets, which decay towards zero would distort, not regularise."""
    warmup = args.warmup if args.warmup is not None else (10 if args.preset == "tiny" else 200)
    schedule = optax.linear_schedule(args.lr / max(warmup, 1), args.lr, max(warmup, 1))
    only_matrices = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(args.clip), optax.adamw(schedule, weight_decay=args.weight_decay, mask=only_matrices)
    )


def cross_entropy(model, inputs, targets, dtype) -> jax.Array:
    """Mean next-token loss, computed in `dtype` with float32 master weights."""
    compute_model = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)
    logits = compute_model(inputs).astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def make_train_step(opt, dtype, accumulation: int):
    """One jitted update: gradients averaged over `accumulation` micro-batches, then AdamW."""

    @eqx.filter_jit
    def step(model, opt_state, inputs, targets):
        def micro_step(grad_sum, batch):
            loss, grads = eqx.filter_value_and_grad(cross_entropy)(model, *batch, dtype)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        micro_batches = jax.tree.map(lambda x: x.reshape(accumulation, -1, *x.shape[1:]), (inputs, targets))
        zeros = jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))
        grad_sum, losses = jax.lax.scan(micro_step, zeros, micro_batches)
        grads = jax.tree.map(lambda g: g / accumulation, grad_sum)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, jnp.mean(losses), optax.global_norm(grads)

    return step


def metrics_up_to(path: Path, step: int):
    """Open the JSONL metrics for appending, after dropping records past `step` (a resumed run replays them)."""
    if path.exists():
        records = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in records))
    return path.open("a")


def batch_sizes(args) -> tuple[int, int]:
    """(examples per update, micro-batches per update), with tokens per update fixed."""
    if args.tokens_per_update % args.context:
        raise SystemExit(f"--tokens-per-update {args.tokens_per_update} must be a multiple of --context {args.context}")
    examples = args.tokens_per_update // args.context
    micro = args.micro_batch or examples
    if examples % micro or micro % jax.device_count():
        raise SystemExit(
            f"--micro-batch {micro} must divide {examples} examples per update and be a multiple of "
            f"{jax.device_count()} devices"
        )
    return examples, examples // micro


class Run(NamedTuple):
    """What the training loop carries from step to step."""

    model: sympow.Transformer
    opt_state: optax.OptState
    step: int  # updates done
    position: int  # examples consumed: where the data stream resumes


def set_up(args) -> tuple[Run, optax.GradientTransformation, data.WindowStream]:
    """A new model and optimizer state, or the last checkpoint in --out (an exact resume:
    weights, optimizer moments, step and data position), and the data stream from there."""
    model = sympow.Transformer(model_config(args), key=jax.random.key(args.seed))
    opt = optimizer(args)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    step, position = 0, 0
    args.out.mkdir(parents=True, exist_ok=True)
    if saved := checkpoint.latest(args.out):
        try:
            model, opt_state, step, position = checkpoint.resume(saved, model, opt_state)
        except ValueError as error:
            sys.exit(f"{error}: use another --out")
        if distributed.is_main():
            print(f"resuming from {saved} (step {step})")
    examples, _ = batch_sizes(args)
    # Each process reads its own share of every update's examples, from the saved position on.
    train_split = data.open_split(data.resolve(args.data), "train")
    stream = data.WindowStream(train_split, args.context, examples, position, jax.process_index(), jax.process_count())
    return Run(model, opt_state, step, position), opt, stream


def data_parallel(run: Run) -> tuple[Run, NamedSharding]:
    """Parameters and optimizer state replicated on every device of every process; the sharding
    that splits a batch's examples over them."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    model, opt_state = distributed.replicated((run.model, run.opt_state), NamedSharding(mesh, PartitionSpec()))
    return run._replace(model=model, opt_state=opt_state), NamedSharding(mesh, PartitionSpec("data"))


def describe(args, run: Run, dtype) -> str:
    examples, accumulation = batch_sizes(args)
    parameters = sum(x.size for x in jax.tree.leaves(eqx.filter(run.model, eqx.is_inexact_array)))
    return (
        f"{args.attention} p={args.p} {args.preset} ({parameters / 1e6:.1f}M parameters), context {args.context}, "
        f"{examples} examples x {accumulation} micro-batches per update, "
        f"{dtype.name} on {jax.device_count()} {jax.default_backend()} device(s)"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
    )


class Throughput:
    """Tokens per second, and seconds waited for data per step, since the last reading."""

    def __init__(self, step: int, tokens_per_update: int, prefetcher: data.Prefetcher):
        self.tokens_per_update, self.prefetcher = tokens_per_update, prefetcher
        self.clock, self.step, self.waited = time.perf_counter(), step, prefetcher.waited

    def read(self, step: int) -> dict:
        now, waited = time.perf_counter(), self.prefetcher.waited
        steps = step - self.step
        reading = dict(
            tokens_per_second=steps * self.tokens_per_update / (now - self.clock),
            data_wait_per_step=(waited - self.waited) / steps,
        )
        self.clock, self.step, self.waited = now, step, waited
        return reading


class Step(NamedTuple):
    """A step dispatched to the devices, its results not yet read."""

    step: int
    loss: jax.Array
    grad_norm: jax.Array


class Reporter:
    """Reads a step's loss on the host, one step late (the next step is queued on the devices by
    then, so they never wait for the host); stops the run on a NaN; writes the metrics
    (process 0) and the progress bar."""

    def __init__(self, args, run: Run, prefetcher: data.Prefetcher):
        self.args = args
        self.metrics = metrics_up_to(args.out / "metrics.jsonl", run.step) if distributed.is_main() else None
        self.throughput = Throughput(run.step, args.tokens_per_update, prefetcher)
        self.progress = tqdm(total=args.steps, initial=run.step, desc="train", disable=not distributed.is_main())

    def report(self, done: Step) -> None:
        loss = float(distributed.local_copy(done.loss))
        if not math.isfinite(loss):
            # Nothing from this step or later has been saved: the last checkpoint stays good.
            sys.exit(
                f"loss is {loss} at step {done.step}; stopping. "
                f"The last good checkpoint is {checkpoint.latest(self.args.out) or 'none (no checkpoint yet)'}."
            )
        self.progress.update(done.step - self.progress.n)
        self.progress.set_postfix(loss=f"{loss:.3f}")
        if self.metrics and (done.step % self.args.log_every == 0 or done.step == self.args.steps):
            grad_norm = float(distributed.local_copy(done.grad_norm))
            record = dict(
                step=done.step, loss=loss, grad_norm=grad_norm, tokens=done.step * self.args.tokens_per_update
            )
            self.metrics.write(json.dumps(record | self.throughput.read(done.step)) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        self.progress.close()
        if self.metrics:
            self.metrics.close()


def main(argv=None) -> None:
    args = parse_args(argv)
    distributed.initialize(args)
    dtype = jnp.dtype(args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32"))
    run, opt, stream = set_up(args)
    run, batch_sharding = data_parallel(run)
    train_step = make_train_step(opt, dtype, accumulation=batch_sizes(args)[1])
    if distributed.is_main():
        print(describe(args, run, dtype))

    prefetcher = data.Prefetcher(stream, count=args.steps - run.step)
    reporter = Reporter(args, run, prefetcher)
    dispatched = None
    try:
        while run.step < args.steps:
            batch = prefetcher.next()
            inputs, targets = (
                jax.make_array_from_process_local_data(batch_sharding, a) for a in (batch.inputs, batch.targets)
            )
            model, opt_state, loss, grad_norm = train_step(run.model, run.opt_state, inputs, targets)
            run = Run(model, opt_state, run.step + 1, batch.position)
            # The previous step's loss is read only now, with this one queued behind it.
            if dispatched:
                reporter.report(dispatched)
            dispatched = Step(run.step, loss, grad_norm)
            if run.step % args.checkpoint_every == 0 or run.step == args.steps:
                reporter.report(dispatched)  # a model is saved only once its loss is known to be finite
                dispatched = None
                if distributed.is_main():
                    model, opt_state = distributed.local_copy((run.model, run.opt_state))
                    checkpoint.save(args.out, run.step, model, opt_state, run.position, vars(args))
    except (jax.errors.JaxRuntimeError, ValueError) as error:
        if jax.process_count() == 1 or isinstance(error, data.CorruptData):
            raise
        distributed.stop_after_lost_peer(error)
    finally:
        prefetcher.close()
        reporter.close()
    if jax.process_count() > 1:
        print(f"process {jax.process_index()} of {jax.process_count()}: read {stream.windows_read} windows")


if __name__ == "__main__":
    main()
