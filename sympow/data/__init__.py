"""Data: LongCrawl64-layout token stores, the paper's batching (read ahead on a thread), and the
embedded default corpus."""

from sympow.data.batches import WindowStream
from sympow.data.embedded import embedded_corpus
from sympow.data.hf import hf_store, pack_records
from sympow.data.prefetch import Batch, Prefetcher
from sympow.data.store import CorruptData, check_tokens, open_split, write_split
from sympow.data.tokenizer import END_OF_TEXT, VOCAB_SIZE, gpt2_encoding


def resolve(data: str) -> str:
    """A --data value as a store root: "embedded" (the default corpus), "hf:NAME[:CONFIG]" (a
    Hugging Face text dataset, packed once), or a folder / fsspec URL with train.zarr and heldout.zarr."""
    if data == "embedded":
        return embedded_corpus()
    if data.startswith("hf:"):
        return hf_store(data.removeprefix("hf:"))
    return data


__all__ = [
    "END_OF_TEXT",
    "Batch",
    "Prefetcher",
    "VOCAB_SIZE",
    "CorruptData",
    "WindowStream",
    "check_tokens",
    "embedded_corpus",
    "gpt2_encoding",
    "hf_store",
    "open_split",
    "pack_records",
    "resolve",
    "write_split",
]
