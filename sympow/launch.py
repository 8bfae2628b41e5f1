"""Start N processes of a script on this machine as one jax.distributed run: to try several
processes before using several hosts.

    python -m sympow.launch --num-processes 2 --cpu-devices 1 -- train.py --preset tiny --out runs/two

Each process runs `python SCRIPT ARGS --coordinator 127.0.0.1:PORT --num-processes N --process-id I`
(a free port unless --port). On real hosts run the same script on each, with process 0's address
(README, "Several processes"). If a process fails, the others get --grace seconds to stop on
their own (train.py does once a collective fails) and are then ended; the exit status is the
first failure's.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from sympow import cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(
        prog="python -m sympow.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-processes", type=cli.positive(int), required=True)
    parser.add_argument(
        "--port",
        type=cli.number(int, 1, maximum=65535),
        default=None,
        help="the coordinator's port (default: a free one)",
    )
    parser.add_argument(
        "--cpu-devices", type=cli.positive(int), default=None, help="run on the CPU with this many devices per process"
    )
    parser.add_argument(
        "--grace", type=cli.non_negative(float), default=60.0, help="seconds the others get after a process fails"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS]")
    args = parser.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.command:
        parser.refuse("give the script to run after --, e.g. -- train.py --out runs/two")
    return args


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment(cpu_devices: int | None) -> dict:
    if cpu_devices is None:
        return dict(os.environ)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={cpu_devices}"
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()}


def wait_for_all(processes: list[subprocess.Popen], grace: float) -> int:
    """0 if every process succeeds; else the first failure's status, after giving the rest
    `grace` seconds and then ending them."""
    while True:
        codes = [process.poll() for process in processes]
        failed = [code for code in codes if code not in (None, 0)]
        if not failed and None not in codes:
            return 0
        if failed:
            deadline = time.monotonic() + grace
            while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
                time.sleep(0.2)
            for process in processes:
                if process.poll() is None:
                    print(f"launch: ending process {processes.index(process)} ({grace:.0f} s after a failure)")
                    process.kill()
            return failed[0]
        time.sleep(0.2)


def main(argv=None) -> None:
    args = parse_args(argv)
    address = f"127.0.0.1:{args.port or free_port()}"
    env = environment(args.cpu_devices)
    processes = [
        subprocess.Popen(
            [sys.executable, *args.command]
            + ["--coordinator", address, "--num-processes", str(args.num_processes), "--process-id", str(index)],
            env=env,
        )
        for index in range(args.num_processes)
    ]
    forward_stop_signals(processes)
    sys.exit(wait_for_all(processes, args.grace))


def forward_stop_signals(processes: list[subprocess.Popen]) -> None:
    """SIGTERM or SIGINT to the launcher becomes SIGTERM to every process (train.py then saves and
    stops, all at the same step); a second SIGINT ends them at once."""
    stops = []

    def handle(number, frame):
        stops.append(number)
        if len(stops) > 1 and number == signal.SIGINT:
            for process in processes:
                process.kill()
            sys.exit(130)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, handle)


if __name__ == "__main__":
    main()
