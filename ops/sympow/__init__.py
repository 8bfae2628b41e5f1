"""Symmetric power attention: the public API (api.py), the maths (naive.py), the chunked form
(chunk.py) and the Triton kernels (triton/)."""

from ops.sympow.api import (
    DEFAULT_CHUNK_SIZE,
    IMPLS,
    check_power,
    state_fits,
    sympow_attention,
    sympow_embedding,
    sympow_step,
    zero_state,
)
from ops.sympow.naive import SympowState, embedding_size

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IMPLS",
    "SympowState",
    "check_power",
    "embedding_size",
    "state_fits",
    "sympow_attention",
    "sympow_embedding",
    "sympow_step",
    "zero_state",
]
