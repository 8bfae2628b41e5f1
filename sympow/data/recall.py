"""Associative recall data, generated on the fly: the standard probe of a finite state.

Two tasks, each a `--data` value with its parameters (`name:key=value,...`):

- `mqar:pairs=N,keys=K,values=V` is multi-query associative recall as Zoology defines it: N
  key-value pairs (keys distinct), then each of the N keys once more at a random place in the
  rest of the sequence, each followed by its value; the other places hold the filler token 0.
  Every pair is needed until the end, so a gate cannot help: it is the control.
- `recall-stream:pairs=P,keys=K,values=V,fresh=0|1` is a stream of short episodes back to back
  until the context is full: P pairs, then the same P keys in a random order, each followed by
  its value (4P tokens an episode). With `fresh=1` (the default) keys are unique over the whole
  sequence, so old pairs only take up room (K must cover every episode); with `fresh=0` each
  episode draws its keys afresh from the K, so old pairs of a key go stale and conflict with the
  current one. An ungated state must hold every pair it has seen; a gated one only the current
  episode's.

Token 0 is the filler, keys are 1..K and values K+1..K+V, so keys and values never share a
token. The loss and accuracy count only answers: the positions whose next token is a queried
value. Sequence e of a split is drawn from numpy's generator seeded with (seed, split, e), so
a batch depends only on its position: a run resumes exactly, and every process draws its own
rows.
"""

import dataclasses

import numpy as np

SPLITS = {"train": 0, "heldout": 1}
TASKS = ("mqar", "recall-stream")
FILLER = 0


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """A task and its parameters, as parsed from a --data value."""

    name: str
    pairs: int
    keys: int
    values: int
    fresh: bool = True

    @property
    def vocab_size(self) -> int:
        return 1 + self.keys + self.values

    def check(self, context: int) -> None:
        """Raise ValueError unless sequences of `context` tokens can be made."""
        if self.name == "mqar":
            if 4 * self.pairs > context + 1:
                raise ValueError(
                    f"{self.pairs} pairs and their queries take {4 * self.pairs} tokens; context {context}"
                )
            if self.pairs > self.keys:
                raise ValueError(f"{self.pairs} distinct keys cannot be drawn from {self.keys}")
            return
        episode = 4 * self.pairs
        if context + 1 < episode:
            raise ValueError(f"an episode of {self.pairs} pairs takes {episode} tokens; context {context} is shorter")
        needed = self.pairs * -(-(context + 1) // episode) if self.fresh else self.pairs
        if needed > self.keys:
            unique = "over the sequence" if self.fresh else "within an episode"
            raise ValueError(
                f"{needed} distinct keys are needed for context {context} (unique {unique}); keys={self.keys}"
            )

    def sequence(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [length], answers [length] bool: the positions that hold a queried value)."""
        return (self.mqar if self.name == "mqar" else self.stream)(rng, length)

    def mqar(self, rng, length):
        keys = 1 + rng.choice(self.keys, self.pairs, replace=False)
        values = 1 + self.keys + rng.integers(0, self.values, self.pairs)
        tokens = np.full(length, FILLER, np.int32)
        answers = np.zeros(length, bool)
        tokens[0 : 2 * self.pairs : 2], tokens[1 : 2 * self.pairs : 2] = keys, values
        # Queries at random even offsets of the rest: key, then its value.
        slots = (length - 2 * self.pairs) // 2
        starts = 2 * self.pairs + 2 * np.sort(rng.choice(slots, self.pairs, replace=False))
        order = rng.permutation(self.pairs)
        tokens[starts], tokens[starts + 1] = keys[order], values[order]
        answers[starts + 1] = True
        return tokens, answers

    def stream(self, rng, length):
        episodes = -(-length // (4 * self.pairs))
        if self.fresh:
            all_keys = 1 + rng.choice(self.keys, self.pairs * episodes, replace=False).reshape(episodes, self.pairs)
        else:
            all_keys = np.stack([1 + rng.choice(self.keys, self.pairs, replace=False) for _ in range(episodes)])
        values = 1 + self.keys + rng.integers(0, self.values, (episodes, self.pairs))
        order = np.argsort(rng.random((episodes, self.pairs)), axis=1)
        queried_keys, queried_values = (np.take_along_axis(a, order, axis=1) for a in (all_keys, values))
        episode = np.empty((episodes, 4 * self.pairs), np.int32)
        episode[:, 0 : 2 * self.pairs : 2], episode[:, 1 : 2 * self.pairs : 2] = all_keys, values
        episode[:, 2 * self.pairs :: 2], episode[:, 2 * self.pairs + 1 :: 2] = queried_keys, queried_values
        answers = np.zeros((episodes, 4 * self.pairs), bool)
        answers[:, 2 * self.pairs + 1 :: 2] = True
        return episode.reshape(-1)[:length], answers.reshape(-1)[:length]


def parse(spec: str) -> RecallTask:
    """'mqar:pairs=64,keys=256,values=256' or 'recall-stream:pairs=8,keys=32,values=16,fresh=0'."""
    name, _, rest = spec.partition(":")
    if name not in TASKS:
        raise ValueError(f"unknown recall task {name!r}; choose one of {TASKS}")
    fields = {field.name: field.type for field in dataclasses.fields(RecallTask) if field.name != "name"}
    given = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in fields or not value.isdigit():
            raise ValueError(f"{spec!r}: {item!r} is not one of {', '.join(f'{k}=N' for k in fields)}")
        given[key] = int(value) if key != "fresh" else bool(int(value))
    missing = {"pairs", "keys", "values"} - set(given)
    if missing:
        raise ValueError(f"{spec!r} needs {', '.join(sorted(missing))}")
    if min(given["pairs"], given["keys"], given["values"]) < 1:
        raise ValueError(f"{spec!r}: pairs, keys and values must be at least 1")
    return RecallTask(name, **given)


def is_recall(spec: str) -> bool:
    return spec.partition(":")[0] in TASKS


@dataclasses.dataclass
class RecallStream:
    """Batches of generated sequences, with WindowStream's interface: `next_batch` gives this
    process's (inputs, targets, mask) of each global batch and advances `position`."""

    task: RecallTask
    context: int
    batch_size: int
    position: int = 0
    process_index: int = 0
    process_count: int = 1
    split: str = "train"
    seed: int = 0
    windows_read: int = 0
    examples: int = 2**62  # as many as asked: every sequence is new

    def __post_init__(self):
        self.task.check(self.context)
        if self.batch_size % self.process_count:
            raise ValueError(f"batch size {self.batch_size} must split evenly over {self.process_count} processes")

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        return self.task.sequence(rng, self.context + 1)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        local = self.batch_size // self.process_count
        first = self.position + self.process_index * local
        tokens, answers = map(np.stack, zip(*(self.example(first + i) for i in range(local))))
        self.position += self.batch_size
        self.windows_read += local
        return tokens[:, :-1], tokens[:, 1:], answers[:, 1:]
