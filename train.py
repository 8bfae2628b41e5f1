"""Train a (conformal) symmetric power transformer, or the softmax baseline.

    python train.py                         # tiny conformal model on the embedded corpus, CPU, a few minutes
    python train.py --attention sympow --context 1024 --preset 124m --data gs://longcrawl64 --out runs/x

Running the same command again resumes from the last checkpoint in --out, exactly. On several
processes (hosts, or `python -m sympow.launch` on one machine) every process runs this same
script with --coordinator, --num-processes and --process-id (sympow/distributed.py).

The run folder (--out) is the program's: one train.py writes it at a time (a lock), checkpoints
are complete or skipped, a resume that would change what the saved state means is refused, and
SIGTERM or Ctrl-C saves at the next step and stops (README, "The run folder").

Read it in order: the flags, each checked before anything runs; the optimizer and the loss;
`make_train_step`, one jitted update; `open_stream` and `find_checkpoint`, the data and the
checkpoint to resume, both checked; `set_up`, a new run or the checkpoint's; `data_parallel`,
the run placed on every device; `Reporter`, which reads a step's results, stops on a NaN and
writes the metrics; `train`, the step loop (a batch read ahead, a step, the previous step's
report, a checkpoint); and `main`, which holds the folder while it all runs.
"""

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

import sympow
from sympow import checkpoint, cli, data, distributed, run_folder
from sympow.stopping import StopRequest


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, each checked against its domain, and the checks across them that need no JAX
    and no data: a bad value is refused here, exit status 2, before anything is computed."""
    parser = cli.Parser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positive_int, positive_float = cli.positive(int), cli.positive(float)
    parser.add_argument("--attention", default="conformal", choices=sympow.ATTENTIONS)
    parser.add_argument("--p", type=positive_int, default=2, help="power of the symmetric power attention (even)")
    parser.add_argument("--context", type=positive_int, default=256, help="training context (tokens per example)")
    parser.add_argument("--preset", default="tiny", choices=tuple(sympow.PRESETS))
    parser.add_argument("--steps", type=positive_int, default=200, help="optimizer updates")
    parser.add_argument(
        "--tokens-per-update", type=positive_int, default=4096, help="held fixed across contexts (paper: 2^19)"
    )
    parser.add_argument(
        "--micro-batch", type=positive_int, default=None, help="examples per forward pass (default: the whole update)"
    )
    parser.add_argument("--lr", type=positive_float, default=6e-4)
    parser.add_argument(
        "--warmup",
        type=cli.non_negative(int),
        default=None,
        help="linear warmup steps (default: 10 for tiny, 200 otherwise)",
    )
    parser.add_argument("--clip", type=positive_float, default=1.0, help="global gradient norm clip")
    parser.add_argument("--weight-decay", type=cli.non_negative(float), default=0.0)
    parser.add_argument("--chunk-size", type=positive_int, default=None, help="chunk size of the sympow chunked form")
    parser.add_argument("--layers", type=positive_int, default=None, help="blocks (default: the preset's)")
    parser.add_argument("--d-model", type=positive_int, default=None, help="model width (default: the preset's)")
    parser.add_argument("--heads", type=positive_int, default=None, help="attention heads (default: the preset's)")
    parser.add_argument(
        "--kv-heads",
        type=positive_int,
        default=None,
        help="key/value heads, each shared by heads / kv-heads query heads (grouped-query attention; "
        "default: one per head). The state, the gate and the decoding caches are per key/value head",
    )
    parser.add_argument(
        "--mlp-ratio", type=cli.non_negative(int), default=None, help="MLP width / d_model, 0 for none (preset's)"
    )
    parser.add_argument(
        "--token-shift",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add an embedding of the previous token (default: the preset's; on for recall)",
    )
    parser.add_argument(
        "--gate-init", type=cli.number(float, 0, strict=True), default=None, help="the gate's initial gamma (0.999)"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="compute dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    parser.add_argument(
        "--data",
        default="embedded",
        help='"embedded" (GPT-2 tokens), "embedded-bytes" (the same sources as bytes, vocabulary 256), a folder / '
        "fsspec URL holding train.zarr and heldout.zarr, hf:NAME, or a recall task "
        "(mqar:pairs=N,keys=K,values=V or recall-stream:pairs=P,keys=K,values=V,fresh=0|1)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/default"))
    parser.add_argument("--log-every", type=positive_int, default=10)
    parser.add_argument("--checkpoint-every", type=positive_int, default=100)
    parser.add_argument("--keep", type=positive_int, default=2, help="checkpoints kept: the newest K")
    parser.add_argument(
        "--keep-every", type=positive_int, default=None, help="also keep every N-th step's checkpoint forever"
    )
    parser.add_argument(
        "--seed",
        type=cli.non_negative(int),
        default=0,
        help="the initialisation, and a recall task's sequences; a store's windows come in its fixed order",
    )
    distributed.add_flags(parser)
    args = parser.parse_args(argv)
    distributed.check_flags(parser, args)
    if args.p % 2:
        parser.refuse(f"argument --p: must be an even power (odd powers give negative weights); got {args.p}")
    try:
        model_config(args)
    except ValueError as error:  # a bad recall task, or a model the flags cannot make
        parser.refuse(str(error))
    if args.tokens_per_update % args.context:
        parser.refuse(f"--tokens-per-update {args.tokens_per_update} must be a multiple of --context {args.context}")
    examples = args.tokens_per_update // args.context
    if args.micro_batch is not None and examples % args.micro_batch:
        parser.refuse(f"--micro-batch {args.micro_batch} must divide the {examples} examples of an update")
    if args.out.exists() and not args.out.is_dir():
        parser.refuse(f"--out {args.out} is a file, not a folder")
    return args


def model_config(args) -> sympow.ModelConfig:
    """The preset with the flags that override it, over the vocabulary of the data."""
    overrides = dict(attention=args.attention, p=args.p, vocab_size=data.vocab_size(args.data))
    flags = dict(
        chunk_size=args.chunk_size,
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        mlp_ratio=args.mlp_ratio,
        token_shift=args.token_shift,
        gate_init=args.gate_init,
    )
    return sympow.preset(
        args.preset, **overrides, **{name: value for name, value in flags.items() if value is not None}
    )


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


def cross_entropy(model, inputs, targets, mask, dtype) -> tuple[jax.Array, jax.Array]:
    """Mean next-token loss over the targets the mask counts (all of them for text; the answers
    of a recall task), computed in `dtype` with float32 master weights; and, beside it, the
    fraction of those targets predicted (argmax)."""
    compute_model = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)
    logits = compute_model(inputs).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    weights = mask.astype(jnp.float32)
    counted = jnp.maximum(jnp.sum(weights), 1.0)
    accuracy = jnp.sum(weights * (jnp.argmax(logits, axis=-1) == targets)) / counted
    return jnp.sum(weights * losses) / counted, accuracy


class StepResults(NamedTuple):
    """What the host reads of a step, one step late."""

    loss: jax.Array
    accuracy: jax.Array  # of the targets the mask counts
    grad_norm: jax.Array
    stop: jax.Array  # the signal any process was asked to stop by, 0 for none


def make_train_step(opt, dtype, accumulation: int):
    """One jitted update: gradients averaged over `accumulation` micro-batches, then AdamW. `stop`
    holds, per device, the signal its process was asked to stop by (0: none); the step returns
    its maximum over every device, so all processes read the same request at the same step."""

    @eqx.filter_jit
    def step(model, opt_state, inputs, targets, mask, stop):
        def micro_step(grad_sum, batch):
            (loss, accuracy), grads = eqx.filter_value_and_grad(cross_entropy, has_aux=True)(model, *batch, dtype)
            return jax.tree.map(jnp.add, grad_sum, grads), (loss, accuracy)

        micro_batches = jax.tree.map(lambda x: x.reshape(accumulation, -1, *x.shape[1:]), (inputs, targets, mask))
        zeros = jax.tree.map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))
        grad_sum, (losses, accuracies) = jax.lax.scan(micro_step, zeros, micro_batches)
        grads = jax.tree.map(lambda g: g / accumulation, grad_sum)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        results = StepResults(jnp.mean(losses), jnp.mean(accuracies), optax.tree_utils.tree_norm(grads), jnp.max(stop))
        return eqx.apply_updates(model, updates), opt_state, results

    return step


def batch_sizes(args) -> tuple[int, int]:
    """(examples per update, micro-batches per update), with tokens per update fixed; refuses a
    micro-batch that does not split over the devices."""
    examples = args.tokens_per_update // args.context
    micro = args.micro_batch or examples
    if micro % jax.device_count():
        cli.refuse(f"--micro-batch {micro} must be a multiple of the {jax.device_count()} devices")
    return examples, examples // micro


class Run(NamedTuple):
    """What the training loop carries from step to step."""

    model: sympow.Transformer
    opt_state: optax.OptState
    step: int  # updates done
    position: int  # examples consumed: where the data stream resumes


def open_stream(args, position: int, vocab_size: int) -> data.WindowStream | data.RecallStream:
    """The training batches from `position` on, this process's share of each update; refuses a
    context or update the data cannot give, and says so when the run passes over a store again."""
    examples, _ = batch_sizes(args)
    process = (jax.process_index(), jax.process_count())
    try:
        stream = data.open_stream(
            args.data, "train", args.context, examples, position, *process, seed=args.seed, vocab_size=vocab_size
        )
    except data.CorruptData:
        raise
    except ValueError as error:  # a context the store's rows or the task's episodes cannot hold
        cli.refuse(f"--context {args.context}: {error}")
    if examples > stream.examples:
        cli.refuse(
            f"an update takes {examples} windows of {args.context} tokens and the store holds only {stream.examples}: "
            "lower --tokens-per-update"
        )
    if (needed := (args.steps * examples)) > stream.examples and distributed.is_main():
        print(f"note: the run reads {needed} windows and the store holds {stream.examples}: it will read them again")
    return stream


def find_checkpoint(args, config: sympow.ModelConfig) -> tuple[Path | None, dict]:
    """The newest complete checkpoint in --out and what this run changes of its settings; refuses
    a resume that changes what the saved state means. Damaged checkpoints newer than it are
    renamed *.damaged (out of the way of this run's saves, kept for a look)."""
    saved = checkpoint.latest(args.out, warn=checkpoint.warn_to_stderr if distributed.is_main() else lambda _: None)
    meta = checkpoint.meta(saved) if saved else None
    if distributed.is_main():
        checkpoint.set_aside_newer(args.out, meta["step"] if meta else 0)
    if saved is None:
        return None, {}
    refused, changed = run_folder.resume_differences(meta["args"], vars(args))
    if (saved_config := sympow.ModelConfig(**meta["config"])) != config:  # a field added since: its default
        refused.append(f"model config: saved {saved_config}, now {config}")
    if refused:
        cli.refuse(
            f"{saved} cannot be resumed with these settings, which give it its meaning: "
            + "; ".join(refused)
            + ". Give the saved values, or another --out"
        )
    return saved, changed


def set_up(args, saved: Path | None) -> tuple[Run, optax.GradientTransformation]:
    """A new model and optimizer state, or the checkpoint's (an exact resume: weights, optimizer
    moments, step and data position)."""
    model = sympow.Transformer(model_config(args), key=jax.random.key(args.seed))
    opt = optimizer(args)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    if saved is None:
        return Run(model, opt_state, 0, 0), opt
    model, opt_state, step, position = checkpoint.resume(saved, model, opt_state)
    return Run(model, opt_state, step, position), opt


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
    """Tokens per second, and seconds waited for data per step, since the last reading.

    Time is read when a step's dispatch returns, the one event that every step has at the same
    place in the loop: on a GPU, dispatch returns as soon as the step is queued, which is once
    the step two before it has finished (the loop waits on each step's loss one step late); on a
    CPU, once the step itself has run. Either way the time between two steps' dispatches is
    that of as many steps' work, the final step's and a checkpoint's neighbours' included (a
    save counts in the interval it falls in)."""

    def __init__(self, step: int, tokens_per_update: int, prefetcher: data.Prefetcher):
        self.tokens_per_update, self.prefetcher = tokens_per_update, prefetcher
        self.clock, self.step, self.waited = time.perf_counter(), step, prefetcher.waited

    def read(self, step: int, dispatched: float) -> dict:
        waited = self.prefetcher.waited
        steps = step - self.step
        reading = dict(
            tokens_per_second=steps * self.tokens_per_update / (dispatched - self.clock),
            data_wait_per_step=(waited - self.waited) / steps,
        )
        self.clock, self.step, self.waited = dispatched, step, waited
        return reading


class Step(NamedTuple):
    """A step dispatched to the devices, its results not yet read."""

    run: Run  # the run after it
    results: StepResults
    dispatched: float  # when its dispatch returned (time.perf_counter)


class Reporter:
    """Reads a step's results on the host; stops the run on a NaN; writes the metrics (process 0,
    the run folder's lock holder) and the progress bar."""

    def __init__(self, args, run: Run, prefetcher: data.Prefetcher):
        self.args = args
        self.metrics = run_folder.open_metrics(args.out / "metrics.jsonl", run.step) if distributed.is_main() else None
        self.throughput = Throughput(run.step, args.tokens_per_update, prefetcher)
        self.progress = tqdm(total=args.steps, initial=run.step, desc="train", disable=not distributed.is_main())

    def write(self, record: dict) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def report(self, done: Step) -> int:
        """Read a step's results; returns the stop signal asked for by then (0: none)."""
        step = done.run.step
        loss, accuracy, grad_norm, stop = (float(x) for x in distributed.local_copy(done.results))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            # Nothing from this step or later has been saved: the last checkpoint stays good.
            good = checkpoint.latest(self.args.out)
            sys.exit(
                f"loss is {loss} (gradient norm {grad_norm}) at step {step}; stopping. "
                f"The last good checkpoint is {good or 'none (no checkpoint yet)'}."
            )
        self.progress.update(step - self.progress.n)
        self.progress.set_postfix(loss=f"{loss:.3f}")
        if step % self.args.log_every == 0 or step == self.args.steps:
            reading = dict(
                step=step, loss=loss, accuracy=accuracy, grad_norm=grad_norm, tokens=step * self.args.tokens_per_update
            )
            self.write(reading | self.throughput.read(step, done.dispatched))
        return int(stop)

    def close(self) -> None:
        self.progress.close()
        if self.metrics:
            self.metrics.close()


def save(args, run: Run) -> Path | None:
    """Process 0 writes the checkpoint (every process holds the same replicated state)."""
    if not distributed.is_main():
        return None
    model, opt_state = distributed.local_copy((run.model, run.opt_state))
    saved_args = run_folder.as_saved(vars(args))
    return checkpoint.save(
        args.out, run.step, model, opt_state, run.position, saved_args, keep=args.keep, keep_every=args.keep_every
    )


def train(args, run: Run, train_step, prefetcher, reporter: Reporter, batch_sharding, stop: StopRequest):
    """The step loop, to --steps or to a stop asked for by a signal; returns (the run after its
    last step, the signal that stopped it or 0). Each step's results are read only once the next
    step is queued behind it, so the devices never wait for the host; a checkpoint is written
    only after its step's loss and gradient norm are read as finite."""
    stopping = 0  # the signal a stop was asked by, on any process, as the last step read says
    pending = None  # the step dispatched last time round
    while True:
        launched = None
        if run.step < args.steps and not stopping:
            batch = prefetcher.next()
            asked = np.full(jax.local_device_count(), stop.signal or 0, np.int32)
            arrays = (batch.inputs, batch.targets, batch.mask, asked)
            model, opt_state, results = train_step(
                run.model, run.opt_state, *(jax.make_array_from_process_local_data(batch_sharding, a) for a in arrays)
            )
            run = Run(model, opt_state, run.step + 1, batch.position)
            launched = Step(run, results, time.perf_counter())
        if pending:
            stopping = reporter.report(pending) or stopping
            if pending.run.step % args.checkpoint_every == 0 or launched is None:
                save(args, pending.run)
        if launched is None:
            return run, stopping
        pending = launched


def main(argv=None) -> None:
    args = parse_args(argv)
    stop = StopRequest()
    distributed.initialize(args)
    stop.install()
    batch_sizes(args)  # refuses a micro-batch the devices cannot split, before any work
    lock = None
    try:
        if distributed.is_main():
            args.out.mkdir(parents=True, exist_ok=True)
            lock = take_folder(args.out)
        saved, changed = find_checkpoint(args, model_config(args))
        stream = open_stream(args, checkpoint.meta(saved)["position"] if saved else 0, model_config(args).vocab_size)
        run, opt = set_up(args, saved)
        run_steps(args, run, opt, stream, saved, changed, stop)
    except (FileNotFoundError, data.CorruptData, checkpoint.DamagedCheckpoint, checkpoint.SaveFailed) as error:
        sys.exit(f"stopping: {error}")
    finally:
        if lock:
            lock.release()


def run_steps(args, run: Run, opt, stream: data.WindowStream, saved: Path | None, changed: dict, stop) -> None:
    """Place the run on the devices, train, and end as a signal asked (status 128 + its number)."""
    dtype = jnp.dtype(args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32"))
    run, batch_sharding = data_parallel(run)
    train_step = make_train_step(opt, dtype, accumulation=batch_sizes(args)[1])
    if distributed.is_main():
        if saved:
            changes = "".join(f"; --{name.replace('_', '-')} {old} -> {new}" for name, (old, new) in changed.items())
            print(f"resuming from {saved} (step {run.step}){changes}")
        print(describe(args, run, dtype))
    prefetcher = data.Prefetcher(stream, count=args.steps - run.step)
    reporter = Reporter(args, run, prefetcher)
    if changed:
        reporter.write(dict(step=run.step, resumed_from=saved.name, changed=changed))
    try:
        run, stopping = train(args, run, train_step, prefetcher, reporter, batch_sharding, stop)
    except (jax.errors.JaxRuntimeError, ValueError) as error:
        if jax.process_count() == 1 or isinstance(error, data.CorruptData):
            raise
        distributed.stop_after_lost_peer(error)
    finally:
        prefetcher.close()
        reporter.close()
    if jax.process_count() > 1:
        print(f"process {jax.process_index()} of {jax.process_count()}: read {stream.windows_read} windows")
    if stopping:
        if distributed.is_main():
            print(
                f"stopped by {signal.Signals(stopping).name} at step {run.step}, saved as "
                f"{checkpoint.folder(args.out, run.step)}: run the same command to resume",
                file=sys.stderr,
            )
        sys.exit(128 + stopping)


def take_folder(out: Path) -> run_folder.RunLock:
    """The run folder's lock, and the folder cleared of what interrupted saves left."""
    try:
        lock = run_folder.RunLock(out)
    except run_folder.FolderInUse as error:
        sys.exit(str(error))
    if lock.stale_holder:
        print(f"note: taking over {out}/.lock from a process that ended without releasing it ({lock.stale_holder})")
    checkpoint.remove_partials(out)
    return lock


if __name__ == "__main__":
    main()
