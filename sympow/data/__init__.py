"""Data: LongCrawl64-layout token stores, the paper's batching, and the embedded default corpus."""

from sympow.data.batches import WindowStream
from sympow.data.embedded import embedded_corpus
from sympow.data.store import CorruptData, check_tokens, open_split, write_split
from sympow.data.tokenizer import END_OF_TEXT, VOCAB_SIZE, gpt2_encoding


def resolve(data: str) -> str:
    """A --data value as a store root: "embedded" (the default corpus) or a path / fsspec URL."""
    return embedded_corpus() if data == "embedded" else data


__all__ = ["END_OF_TEXT", "VOCAB_SIZE", "CorruptData", "WindowStream", "check_tokens", "embedded_corpus", "gpt2_encoding", "open_split", "resolve", "write_split"]
