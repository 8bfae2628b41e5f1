"""Batches read ahead of the training step, on a background thread.

Reading a window from a zarr store (local, or remote through fsspec) is I/O and numpy work that
releases the GIL, so a thread overlaps it with the step the devices run. The queue is bounded:
at most `depth` batches wait, so memory stays a few batches and a slow store shows up as the
step loop waiting (`Prefetcher.waited`), not as an ever-growing backlog.

Data order and exact resume are the stream's: batches come out in the order `next_batch` makes
them, each with the stream position after it, which is what a checkpoint must save (the
thread's own position runs ahead). A thread rather than a loader library (Grain, say): the
paper's batching (column by column, a process's rows of each global batch) is already a small
deterministic function of the position, so the only thing missing was the overlap.
"""

import queue
import threading
import time
from typing import NamedTuple

import numpy as np

from sympow.data.batches import WindowStream
from sympow.data.recall import RecallStream


class Batch(NamedTuple):
    inputs: np.ndarray  # [local batch, context]
    targets: np.ndarray  # [local batch, context]
    mask: np.ndarray  # [local batch, context] bool: the targets that count in the loss
    position: int  # the stream's position after this batch: where a resume starts


class Prefetcher:
    """Iterates over `count` of a stream's batches, `depth` ahead, on a daemon thread (so it
    reads nothing past the last one wanted). An error while reading comes out of `next()` in
    the step loop, with the reader's traceback."""

    def __init__(self, stream: WindowStream | RecallStream, count: int, depth: int = 2):
        self.stream, self.count = stream, count
        self.batches: queue.Queue = queue.Queue(maxsize=depth)
        self.stopping = threading.Event()
        self.waited = 0.0  # seconds the consumer has spent waiting for a batch
        self.thread = threading.Thread(target=self.read_ahead, name="prefetch", daemon=True)
        self.thread.start()

    def read_ahead(self):
        try:
            for _ in range(self.count):
                if self.stopping.is_set():
                    return
                self.put(Batch(*self.stream.next_batch(), self.stream.position))
        except BaseException as error:  # handed to the step loop, which raises it
            self.put(error)

    def put(self, item):
        while not self.stopping.is_set():
            try:
                self.batches.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> Batch:
        start = time.perf_counter()
        item = self.batches.get()
        self.waited += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stopping.set()
        self.thread.join(timeout=5)
