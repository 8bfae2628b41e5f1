"""The recurrent form: one token at a time with the D x dim_v state, O(D d) per token. It is
ops.sympow_step, and impl="recurrent" as a scan of it."""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ops.sympow.attention_form import normalise
from ops.sympow.embedding import symmetric_power_embedding
from ops.sympow.groups import grouped, ungrouped
from ops.sympow.state import SympowState, decay_and_add, empty_state


def recurrent_step(
    q: Float[Array, "batch heads dim"],
    k: Float[Array, "batch kv_heads dim"],
    v: Float[Array, "batch kv_heads dv"],
    log_g: Float[Array, "batch kv_heads"],
    state: SympowState,
    p: int,
    scale: float,
) -> tuple[Float[Array, "batch heads dv"], SympowState]:
    """One token: S = gamma S + phi(r k) v^T, z = gamma z + phi(r k), y = phi(r q)^T S / phi(r q)^T z,
    the state per key/value head, each query head reading its own (ops.sympow.groups)."""
    root_scale = math.sqrt(scale)
    phi_k = symmetric_power_embedding(k * root_scale, p)
    state = decay_and_add(state, log_g, SympowState(phi_k[..., :, None] * v[..., None, :], phi_k))
    phi_q = symmetric_power_embedding(grouped(q, k.shape[1], axis=1) * root_scale, p)
    numerator = jnp.einsum("bhgD,bhDv->bhgv", phi_q, state.S)
    denominator = jnp.einsum("bhgD,bhD->bhg", phi_q, state.z)
    # The stabiliser is the denominator itself; a row with no weight stays 0.
    stabiliser = jnp.where(denominator > 0, denominator, jnp.ones_like(denominator))
    return ungrouped(normalise(numerator / stabiliser[..., None], denominator / stabiliser), axis=1), state


def recurrent_form(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq kv_heads dim"],
    v: Float[Array, "batch seq kv_heads dv"],
    log_g: Float[Array, "batch seq kv_heads"] | None,
    p: int,
    scale: float,
    initial_state: SympowState | None = None,
) -> tuple[Float[Array, "batch seq heads dv"], SympowState]:
    """`recurrent_step` over the tokens, from the given state (or zero); returns y and the last state."""
    batch, _, kv_heads, dim = k.shape
    if log_g is None:
        log_g = jnp.zeros(k.shape[:3], k.dtype)
    if initial_state is None:
        initial_state = empty_state(batch, kv_heads, dim, v.shape[-1], p, v.dtype)

    def step(state, token):
        y, state = recurrent_step(*token, state, p, scale)
        return state, y

    tokens = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, log_g))
    state, y = jax.lax.scan(step, initial_state, tokens)
    return jnp.moveaxis(y, 0, 1), state
