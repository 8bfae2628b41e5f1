"""Several processes as one run, on JAX's own distributed runtime.

Each process runs the same script; `jax.distributed.initialize` connects them through a
coordinator (process 0's address), after which `jax.devices()` lists every process's devices and
one jitted step runs on all of them (collectives over NCCL on GPUs, gloo on CPUs). Without
--coordinator, --num-processes and --process-id, JAX detects the cluster itself (SLURM, Open MPI,
...). Try it on one machine with `python -m sympow.launch`.

Only process 0 writes metrics and checkpoints; every process reads the checkpoint to resume, so
--out must be one folder all processes see (the same machine, or a shared file system).
"""

import os
import socket
import sys
import threading
import time

import equinox as eqx
import jax
import numpy as np

from sympow import cli


def add_flags(parser: cli.Parser) -> None:
    group = parser.add_argument_group("several processes (jax.distributed)")
    group.add_argument("--distributed", action="store_true", help="join a multi-process run (implied by --coordinator)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (default: detect the cluster)")
    group.add_argument("--num-processes", type=cli.positive(int), help="processes in the run")
    group.add_argument("--process-id", type=cli.non_negative(int), help="this process's index, 0..num-processes-1")
    group.add_argument(
        "--heartbeat-timeout",
        type=cli.positive(int),
        default=60,
        help="seconds without a heartbeat after which the runtime counts a process as dead",
    )
    group.add_argument(
        "--init-timeout",
        type=cli.positive(int),
        default=60,
        help="seconds to wait for every process to join; then the run stops, naming those that did not",
    )


def check_flags(parser: cli.Parser, args) -> None:
    """Refuse half-given addresses and a process id out of range (exit status 2, nothing started)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(value is None for value in explicit) and any(value is not None for value in explicit):
        parser.refuse("--coordinator, --num-processes and --process-id go together (or none, to detect the cluster)")
    if args.num_processes is not None and args.process_id >= args.num_processes:
        parser.refuse(f"--process-id must be in 0..{args.num_processes - 1}; got {args.process_id}")
    if args.coordinator is not None:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            parser.refuse(f"--coordinator must be HOST:PORT with a port in 1..65535; got {args.coordinator!r}")


def initialize(args) -> None:
    """Join the run if asked to (a no-op for a single process), within --init-timeout seconds.

    With an explicit coordinator the processes first meet in a roll call on its port, so that
    process 0 can name the processes that never came (JAX's own wait would abort after its
    timeout with no names). Then JAX's runtime takes the port over."""
    if not args.distributed and args.coordinator is None:
        return
    deadline = time.monotonic() + args.init_timeout
    if args.coordinator is not None:
        roll_call(args.coordinator, args.num_processes, args.process_id, deadline, args.init_timeout)
    # JAX's own timeout comes later than ours: on time, it would end the process with a C++ abort.
    watchdog = threading.Timer(deadline - time.monotonic(), not_joined, (args.init_timeout,))
    watchdog.daemon = True
    watchdog.start()
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
        initialization_timeout=args.init_timeout + 30,
    )
    watchdog.cancel()


def not_joined(timeout: int) -> None:
    print(
        f"the run's processes did not all join within {timeout} s (--init-timeout): check that every one was "
        "started, with the same --coordinator, --num-processes and a --process-id of its own",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)


def roll_call(coordinator: str, count: int, index: int, deadline: float, timeout: int) -> None:
    """Process 0 listens on the coordinator's port until every other process has said its index
    (or the deadline), then tells them to go on; the others say theirs and wait for the word."""
    host, _, port = coordinator.rpartition(":")
    if index == 0:
        with socket.create_server(("", int(port))) as server:
            present = listen(server, count, deadline)
            if missing := sorted(set(range(1, count)) - set(present)):
                for connection in present.values():
                    connection.close()
                sys.exit(
                    f"process 0: process(es) {', '.join(map(str, missing))} of {count} did not join within {timeout} s "
                    f"(--init-timeout): start each with --coordinator {coordinator} --num-processes {count} "
                    "--process-id I, or check that they can reach this host"
                )
            for connection in present.values():
                connection.sendall(b"go\n")
            for connection in present.values():  # they close first, so the port is free again for JAX
                connection.settimeout(max(deadline - time.monotonic(), 1))
                connection.recv(1)
                connection.close()
        return
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=1) as connection:
                connection.sendall(f"{index}\n".encode())
                connection.settimeout(max(deadline - time.monotonic(), 0.1))
                if connection.makefile().readline().strip() == "go":
                    return
        except OSError:  # not listening yet (or gone): ask again until the deadline
            time.sleep(0.2)
    sys.exit(f"process {index}: process 0 at {coordinator} did not gather the run within {timeout} s (--init-timeout)")


def listen(server: socket.socket, count: int, deadline: float) -> dict:
    """{index: connection} of the processes that said their index before the deadline."""
    present = {}
    while len(present) < count - 1 and (left := deadline - time.monotonic()) > 0:
        server.settimeout(left)
        try:
            connection, _ = server.accept()
            connection.settimeout(max(deadline - time.monotonic(), 0.1))
            said = connection.makefile().readline().strip()
        except OSError:
            break
        if said.isdigit() and 0 < int(said) < count:
            present[int(said)] = connection
        else:  # not one of ours
            connection.close()
    return present


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
