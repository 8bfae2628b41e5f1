"""SIGTERM (what a cluster scheduler sends before it kills a job) and SIGINT (Ctrl-C) ask a run to
stop: it saves a checkpoint at the next step boundary, says where to resume and exits with
128 + the signal's number. A second SIGINT stops at once, without saving.

The request is only noted here; the training step reduces every process's note over all devices
(train.py), so that all processes of a run read the same request at the same step and stop
together."""

import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers for the rest of the process; `signal` is the first one received."""

    def __init__(self):
        self.signal: int | None = None
        self.install()

    def install(self) -> None:
        """Take the signals (again, after jax.distributed.initialize, which
        installs its preemption notifier: it notes SIGTERM and lets the run go on)."""
        for number in SIGNALS:
            signal.signal(number, self.handle)

    def handle(self, number, frame) -> None:
        # os.write, not print: a handler can interrupt a print in progress, and a buffered
        # stream written again from inside its own write raises.
        if self.signal is not None and number == signal.SIGINT:
            os.write(2, b"\nsecond interrupt: stopping now, without saving; the last checkpoint is as it was\n")
            os._exit(128 + number)
        self.signal = self.signal or number
        name = signal.Signals(number).name
        os.write(2, f"\n{name}: saving a checkpoint after this step, then stopping (Ctrl-C again: now)\n".encode())
