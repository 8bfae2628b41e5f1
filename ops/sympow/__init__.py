"""Symmetric power attention: the public API (api.py) over the attention form in log space
(attention_form.py), the recurrent form (recurrent.py), the chunked form (chunk.py) and the
Triton kernels (triton/); phi_p (embedding.py), the state (state.py) and the key/value cache
(cache.py). naive.py is the maths
as on paper, the float64 oracle of the tests, and nothing in production uses it."""

from ops.sympow.api import (
    DEFAULT_CHUNK_SIZE,
    IMPLS,
    check_power,
    key_value_cache,
    state_fits,
    sympow_attention,
    sympow_cache_step,
    sympow_embedding,
    sympow_step,
    zero_state,
)
from ops.sympow.cache import KeyValueCache
from ops.sympow.embedding import embedding_size
from ops.sympow.state import SympowState

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IMPLS",
    "SympowState",
    "check_power",
    "embedding_size",
    "state_fits",
    "sympow_attention",
    "sympow_cache_step",
    "KeyValueCache",
    "key_value_cache",
    "sympow_embedding",
    "sympow_step",
    "zero_state",
]
