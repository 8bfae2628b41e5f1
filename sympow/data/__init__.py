"""Data: LongCrawl64-layout token stores, the paper's batching (read ahead on a thread), and the
embedded default corpus (GPT-2 tokens or bytes)."""

from sympow.data import recall
from sympow.data.batches import WindowStream
from sympow.data.embedded import embedded_corpus
from sympow.data.hf import hf_store, pack_records
from sympow.data.prefetch import Batch, Prefetcher
from sympow.data.recall import RecallStream
from sympow.data.store import CorruptData, check_tokens, open_split, write_split
from sympow.data.tokenizer import BYTE_VOCAB_SIZE, END_OF_TEXT, VOCAB_SIZE, gpt2_encoding


def vocab_size(data: str) -> int:
    """The vocabulary a --data value's tokens come from: a recall task's own, bytes' for
    "embedded-bytes", else GPT-2's."""
    if recall.is_recall(data):
        return recall.parse(data).vocab_size
    return BYTE_VOCAB_SIZE if data == "embedded-bytes" else VOCAB_SIZE


def open_stream(
    data: str,
    split: str,
    context: int,
    batch_size: int,
    position=0,
    process_index=0,
    process_count=1,
    *,
    seed=0,
    vocab_size=VOCAB_SIZE,
) -> WindowStream | RecallStream:
    """This process's batches of a --data value's split, from `position` on: generated for a
    recall task (from `seed`), else windows of the store's split (ids checked against its
    vocabulary, `vocab_size`)."""
    if recall.is_recall(data):
        task = recall.parse(data)
        if task.vocab_size > vocab_size:
            raise CorruptData(f"{data} has {task.vocab_size} tokens; the model's vocabulary has {vocab_size}")
        return RecallStream(task, context, batch_size, position, process_index, process_count, split=split, seed=seed)
    tokens = open_split(resolve(data), split)
    return WindowStream(tokens, context, batch_size, position, process_index, process_count, vocab_size=vocab_size)


def resolve(data: str) -> str:
    """A --data value as a store root: "embedded" (the default corpus), "embedded-bytes" (the
    same sources as bytes), "hf:NAME[:CONFIG]" (a
    Hugging Face text dataset, packed once), or a folder / fsspec URL with train.zarr and heldout.zarr."""
    if data in ("embedded", "embedded-bytes"):
        return embedded_corpus("bytes" if data == "embedded-bytes" else "gpt2")
    if data.startswith("hf:"):
        return hf_store(data.removeprefix("hf:"))
    return data


__all__ = [
    "END_OF_TEXT",
    "Batch",
    "Prefetcher",
    "RecallStream",
    "VOCAB_SIZE",
    "CorruptData",
    "WindowStream",
    "check_tokens",
    "embedded_corpus",
    "gpt2_encoding",
    "hf_store",
    "open_stream",
    "recall",
    "open_split",
    "pack_records",
    "resolve",
    "vocab_size",
    "write_split",
]
