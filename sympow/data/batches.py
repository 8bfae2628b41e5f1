"""The paper's batching: one example is a window of `context` tokens of one document.

Windows are taken column by column: every document's window 0, then every document's window 1,
and so on, so example e is document e % documents, window e // documents. The input is the
window shifted right by one with end-of-text (the vocabulary's: GPT-2's, or byte 0) first; the
target is the window itself. The data position is the number of examples consumed: store it and
the stream resumes exactly."""

import dataclasses

import numpy as np
import zarr

from sympow.data.store import CorruptData, check_tokens
from sympow.data.tokenizer import VOCAB_SIZE, end_of_text


@dataclasses.dataclass
class WindowStream:
    """Batches of windows from one split, from a given position; each process reads its own rows.

    `batch_size` is the global batch; process i of n gets examples [i*b/n, (i+1)*b/n) of each batch.
    Every window read is checked (`check_tokens`) against `vocab_size`, the model's vocabulary."""

    tokens: zarr.Array
    context: int
    batch_size: int
    position: int = 0
    process_index: int = 0
    process_count: int = 1
    windows_read: int = 0  # windows this process has read: its own share of each batch, nothing more
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self):
        documents, row_length = self.tokens.shape
        if row_length % self.context:
            raise ValueError(f"context {self.context} must divide the row length {row_length}")
        if self.batch_size % self.process_count:
            raise ValueError(f"batch size {self.batch_size} must split evenly over {self.process_count} processes")
        self.windows_per_row = row_length // self.context

    @property
    def examples(self) -> int:
        """Examples in one pass over the split."""
        return self.tokens.shape[0] * self.windows_per_row

    def window(self, example: int) -> tuple[int, int]:
        """(document, first column) of an example, wrapping around after a full pass."""
        documents = self.tokens.shape[0]
        example %= self.examples
        return example % documents, (example // documents) * self.context

    def read(self, first: int, count: int) -> np.ndarray:
        """Windows of examples first..first+count-1 as [count, context] (one slice per run of documents)."""
        rows = []
        example = first
        while example < first + count:
            document, column = self.window(example)
            run = min(first + count - example, self.tokens.shape[0] - document)
            where = f"{self.tokens.store_path}: documents {document}..{document + run - 1}, columns {column}.."
            rows.append(check_tokens(self.block(document, run, column, where), where, self.vocab_size))
            example += run
        self.windows_read += count
        return np.concatenate(rows).astype(np.int32)

    def block(self, document: int, run: int, column: int, where: str) -> np.ndarray:
        try:
            return np.asarray(self.tokens[document : document + run, column : column + self.context])
        except Exception as error:  # the codec's or the file system's: either way that chunk is unreadable
            rows, columns = self.tokens.chunks
            raise CorruptData(
                f"{where}: zarr chunk ({document // rows}, {column // columns}) cannot be read: {error}"
            ) from error

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs, targets, mask) for this process, each [batch_size / process_count, context];
        advances the position. Every target of text counts: the mask is all True."""
        local = self.batch_size // self.process_count
        targets = self.read(self.position + self.process_index * local, local)
        self.position += self.batch_size
        inputs = np.concatenate([np.full((local, 1), end_of_text(self.vocab_size), np.int32), targets[:, :-1]], axis=1)
        return inputs, targets, np.ones(targets.shape, bool)
