"""Several processes as one run, on JAX's own distributed runtime.

Each process runs the same script; `jax.distributed.initialize` connects them through a
coordinator (process 0's address), after which `jax.devices()` lists every process's devices and
one jitted step runs on all of them (collectives over NCCL on GPUs, gloo on CPUs). Without
--coordinator, --num-processes and --process-id, JAX detects the cluster itself (SLURM, Open MPI,
...). Try it on one machine with `python -m sympow.launch`.

Only process 0 writes metrics and checkpoints; every process reads the checkpoint to resume, so
--out must be one folder all processes see (the same machine, or a shared file system).
"""

import argparse
import os
import sys

import equinox as eqx
import jax
import numpy as np


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several processes (jax.distributed)")
    group.add_argument("--distributed", action="store_true", help="join a multi-process run (implied by --coordinator)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (default: detect the cluster)")
    group.add_argument("--num-processes", type=int, help="processes in the run")
    group.add_argument("--process-id", type=int, help="this process's index, 0..num-processes-1")
    group.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=60,
        help="seconds without a heartbeat after which the runtime counts a process as dead",
    )


def initialize(args) -> None:
    """Join the run if asked to; a no-op for a single process. Refuses half-given addresses."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(value is None for value in explicit):
        return
    if any(value is None for value in explicit) and any(value is not None for value in explicit):
        sys.exit("--coordinator, --num-processes and --process-id go together (or none, to detect the cluster)")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        sys.exit(f"--process-id must be in 0..{args.num_processes - 1}; got {args.process_id}")
    if args.heartbeat_timeout < 1:
        sys.exit(f"--heartbeat-timeout must be at least 1 second; got {args.heartbeat_timeout}")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
    )


def is_main() -> bool:
    """Process 0, the one that prints, writes metrics and saves checkpoints."""
    return jax.process_index() == 0


def replicated(tree, sharding):
    """Every array of tree as a global array replicated by sharding, from this process's copy
    (every process holds the same values: the same seed, or the same checkpoint)."""

    def one(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(lambda x: one(x) if eqx.is_array(x) else x, tree)


def local_copy(tree):
    """Every replicated global array of tree as this process's copy of it, readable on the host."""
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def stop_after_lost_peer(error: Exception) -> None:
    """A collective failed in a run of several processes: almost always because another process
    stopped (its own output says why). Say so and end this one now, rather than in the runtime's
    shutdown, which would wait for the lost process and then abort."""
    print(
        f"process {jax.process_index()} of {jax.process_count()}: a step failed ({str(error).splitlines()[0]}). "
        "In a run of several processes this means another one stopped or lost its connection; "
        "its output says why. Stopping; resume from the last checkpoint.",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(1)
