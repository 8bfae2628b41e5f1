"""ops: the symmetric power attention operator, pure-JAX forms and (later) Triton kernels.

Knows nothing of models: import it into any JAX code.
"""

from ops.sympow import DEFAULT_CHUNK_SIZE, IMPLS, embedding_size, sympow_attention, sympow_embedding

__all__ = ["sympow_attention", "sympow_embedding", "embedding_size", "IMPLS", "DEFAULT_CHUNK_SIZE"]
