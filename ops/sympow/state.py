"""The recurrent state of symmetric power attention, as every form hands it over."""

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

from ops.sympow.embedding import embedding_size


class SympowState(NamedTuple):
    """The recurrent state after some tokens, per batch entry and key/value head, in the exact layout (one
    row per non-decreasing multi-index, in `embedding_terms`' order, D = C(dim + p - 1, p)):
    S = sum_j exp(G_T - G_j) phi(r k_j) v_j^T and z = sum_j exp(G_T - G_j) phi(r k_j).
    Raw sums, not divided by any stabiliser: they stay finite, since every decay is <= 1."""

    S: Float[Array, "batch kv_heads D dv"]
    z: Float[Array, "batch kv_heads D"]


def empty_state(batch: int, kv_heads: int, dim: int, dim_v: int, p: int, dtype=jnp.float32) -> SympowState:
    """The state before any token."""
    D = embedding_size(dim, p)
    return SympowState(jnp.zeros((batch, kv_heads, D, dim_v), dtype), jnp.zeros((batch, kv_heads, D), dtype))


def decay_and_add(state: SympowState, log_decay: Float[Array, "batch kv_heads"], added: SympowState) -> SympowState:
    """exp(log_decay) S + added S (z likewise): the state carried over a stretch of tokens."""
    decay = jnp.exp(log_decay)
    return SympowState(decay[..., None, None] * state.S + added.S, decay[..., None] * state.z + added.z)
