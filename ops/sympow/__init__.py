"""Symmetric power attention: the public API (api.py), the maths (naive.py), the chunked form
(chunk.py) and the Triton kernels (triton/)."""

from ops.sympow.api import DEFAULT_CHUNK_SIZE, IMPLS, check_power, sympow_attention, sympow_embedding
from ops.sympow.naive import embedding_size

__all__ = ["DEFAULT_CHUNK_SIZE", "IMPLS", "check_power", "embedding_size", "sympow_attention", "sympow_embedding"]
