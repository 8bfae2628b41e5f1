"""The cumulative gate G_t = sum_{u <= t} log gamma_u as the production forms and kernels take
it: an exact pair hi + lo (ops.exact). With strong gates |G| grows as T |log gamma|, and G_i - G_j
of one rounded float32 G would lose the digits that near neighbours' weights need
(docs/decisions.md, 2026-11-21); each pair is differenced part by part (ops.exact.pair_difference).
The paper's G, a plain array, is ops.sympow.naive.cumulative_gate."""

import jax.numpy as jnp
from jaxtyping import Array, Float

from ops.exact import exact_cumsum

GatePair = tuple[Float[Array, "batch seq kv_heads"], Float[Array, "batch seq kv_heads"]]
ChunkGatePair = tuple[Float[Array, "batch chunks chunk kv_heads"], Float[Array, "batch chunks chunk kv_heads"]]


def exact_cumulative_gate(log_g: Float[Array, "batch seq kv_heads"]) -> GatePair:
    """G_i = sum_{u <= i} log_g_u, over the whole sequence, as (hi, lo)."""
    return exact_cumsum(log_g, axis=1)


def chunk_local_gates(log_g: Float[Array, "batch chunks chunk kv_heads"]) -> ChunkGatePair:
    """L_t = sum_{u=mc..t} log_g_u, the cumulative gate restarted at each chunk, as (hi, lo)."""
    return exact_cumsum(log_g, axis=2)


def reverse_cumsum(x: Array, axis: int) -> Array:
    """sum_{t >= u} x_t along axis: the gradient in log_g of a loss of its cumulative sum,
    d log_g_u = sum_{t >= u} dG_t."""
    return jnp.flip(jnp.cumsum(jnp.flip(x, axis=axis), axis=axis), axis=axis)
