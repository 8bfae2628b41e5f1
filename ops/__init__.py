"""ops: the symmetric power attention operator, pure-JAX forms and Triton kernels.

Knows nothing of models: import it into any JAX code.
"""

from ops.sympow import (
    DEFAULT_CHUNK_SIZE,
    IMPLS,
    KeyValueCache,
    SympowState,
    embedding_size,
    key_value_cache,
    state_fits,
    sympow_attention,
    sympow_cache_step,
    sympow_embedding,
    sympow_step,
    zero_state,
)

__all__ = [
    "sympow_attention",
    "sympow_cache_step",
    "KeyValueCache",
    "key_value_cache",
    "sympow_step",
    "sympow_embedding",
    "SympowState",
    "zero_state",
    "state_fits",
    "embedding_size",
    "IMPLS",
    "DEFAULT_CHUNK_SIZE",
]
