"""Token stores in LongCrawl64's layout: zarr arrays of uint16 GPT-2 ids, [documents, row_length].

LongCrawl64 itself: `train.zarr` (6,609,334 documents) and `heldout.zarr` (52,131), rows of
65,536 tokens, chunks 2048 x 2048, blosc-lz4; each document randomly rolled. Open it from a
local folder or an fsspec URL (gs://..., hf://datasets/...)."""

import numpy as np
import zarr
from numcodecs import Blosc

from sympow.data.tokenizer import END_OF_TEXT

ROW_LENGTH = 65536
CHUNKS = (2048, 2048)
SPLITS = ("train", "heldout")


class CorruptData(ValueError):
    """Tokens that cannot be right: a row of zeros (a missing zarr chunk reads back as zeros) or an id past the
    vocabulary."""


def open_split(root: str, split: str) -> zarr.Array:
    """The [documents, row_length] uint16 array of one split under root (a path or an fsspec URL)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    url = f"{root.rstrip('/')}/{split}.zarr"
    try:
        array = zarr.open_array(url, mode="r")
    except Exception as error:  # zarr raises several kinds; all mean the same to a user
        raise FileNotFoundError(f"no token array at {url}: {error}") from error
    if array.ndim != 2 or array.dtype != np.uint16:
        raise CorruptData(f"{url} must be a 2-d uint16 array of token ids; got {array.ndim}-d {array.dtype}")
    if array.size == 0:
        raise CorruptData(f"{url} holds no tokens (shape {array.shape}): it needs at least one document")
    return array


def write_split(root: str, split: str, tokens: np.ndarray) -> zarr.Array:
    """Write a [documents, row_length] array of token ids in LongCrawl64's layout."""
    chunks = tuple(max(1, min(c, s)) for c, s in zip(CHUNKS, tokens.shape))
    array = zarr.create_array(
        f"{root}/{split}.zarr",
        shape=tokens.shape,
        chunks=chunks,
        dtype=np.uint16,
        zarr_format=2,
        compressors=Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
        overwrite=True,
    )
    array[:] = tokens.astype(np.uint16)
    return array


def check_tokens(tokens: np.ndarray, where: str, vocab_size: int = END_OF_TEXT + 1) -> np.ndarray:
    """Raise CorruptData on an all-zero row or an id past the vocabulary; return the tokens otherwise."""
    zero_rows = np.flatnonzero(~np.any(tokens, axis=-1))
    if zero_rows.size:
        raise CorruptData(
            f"{where}: {zero_rows.size} all-zero row(s) (first: {zero_rows[0]}); a zarr chunk is probably missing"
        )
    if tokens.max(initial=0) >= vocab_size:
        raise CorruptData(
            f"{where}: token id {int(tokens.max())} is past the model's vocabulary (ids 0..{vocab_size - 1})"
        )
    return tokens
