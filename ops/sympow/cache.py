"""Decoding against a key/value cache: the keys and values of the tokens so far in slots of a
fixed maximum length, with the cumulative gate G at each as an exact pair (ops.sympow.gate).
For states too large to hold (p = 4 at head dim 64: D = 766,480), where `sympow_step` cannot
run; O(length x dim) a token. Softmax decodes through the same step with its own weights.

Shapes: q, k [batch, heads, dim] and v [batch, heads, dim_v] for the new token; the cache's k
[batch, max_length, heads, dim], v [batch, max_length, heads, dim_v], gate [batch, max_length,
heads] (hi, lo) or None, length a scalar.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ops.exact import add_pairs, pair_difference
from ops.sympow.attention_form import finite_or_zero, log_abs, normalise
from ops.sympow.gate import GatePair, exact_cumulative_gate


class KeyValueCache(NamedTuple):
    """Keys and values of the first `length` tokens, and G at each (None without a gate)."""

    k: Float[Array, "batch max_length heads dim"]
    v: Float[Array, "batch max_length heads dv"]
    gate: GatePair | None
    length: Int[Array, ""]


def weighted_values(
    log_w: Float[Array, "batch heads seq keys"], v: Float[Array, "batch keys heads dv"]
) -> Float[Array, "batch seq heads dv"]:
    """sum_j w_ij v_j / sum_j w_ij from log w, in the frame of each row's largest weight (a row
    with no weight gives 0). Softmax is this with log w_ij = s q_i . k_j."""
    stabiliser = finite_or_zero(jax.lax.stop_gradient(jnp.max(log_w, axis=-1, keepdims=True)))
    w = jnp.exp(log_w - stabiliser)
    return normalise(jnp.einsum("bhij,bjhd->bihd", w, v), jnp.moveaxis(jnp.sum(w, axis=-1), 1, -1))


def prompt_cache(
    k: Float[Array, "batch seq heads dim"],
    v: Float[Array, "batch seq heads dv"],
    log_g: Float[Array, "batch seq heads"] | None,
    max_length: int,
) -> KeyValueCache:
    """The cache after a prompt's tokens, with room for max_length >= seq tokens in all."""
    batch, seq = k.shape[:2]

    def slots(a):
        return jnp.zeros((batch, max_length, *a.shape[2:]), a.dtype).at[:, :seq].set(a)

    gate = None if log_g is None else tuple(slots(part) for part in exact_cumulative_gate(log_g))
    return KeyValueCache(slots(k), slots(v), gate, jnp.asarray(seq, jnp.int32))


def cache_step(
    q: Float[Array, "batch heads dim"],
    k: Float[Array, "batch heads dim"],
    v: Float[Array, "batch heads dv"],
    log_g: Float[Array, "batch heads"] | None,
    cache: KeyValueCache,
    log_weight: Callable[[Array], Array],
) -> tuple[Float[Array, "batch heads dv"], KeyValueCache]:
    """Write the token into slot `length`, then y = sum_j w_j v_j / sum_j w_j over slots
    0..length, log w_j = log_weight(q . k_j) + G_t - G_j (G_t = G of the slot before plus log_g).
    Past the cache's last slot the output is NaN, so that an overflow shows."""
    slot = cache.length

    def write(buffer, a):
        return jax.lax.dynamic_update_slice_in_dim(buffer, a[:, None].astype(buffer.dtype), slot, axis=1)

    keys, values = write(cache.k, k), write(cache.v, v)
    log_w = log_weight(jnp.einsum("bhd,bjhd->bhj", q, keys))
    gate = None
    if cache.gate is not None:
        # G of the token before (0 before the first): the new token's G goes on from it.
        def at_previous(part):
            return jax.lax.dynamic_index_in_dim(part, jnp.maximum(slot - 1, 0), axis=1, keepdims=False)

        previous = tuple(jnp.where(slot > 0, at_previous(part), 0) for part in cache.gate)
        G = add_pairs(previous, (log_g.astype(previous[0].dtype), jnp.zeros_like(previous[0])))
        gate = tuple(write(buffer, part) for buffer, part in zip(cache.gate, G))
        log_w = log_w + jnp.moveaxis(pair_difference(tuple(part[:, None] for part in G), gate), 1, -1)
    log_w = jnp.where(jnp.arange(keys.shape[1], dtype=slot.dtype) <= slot, log_w, -jnp.inf)
    y = jnp.where(slot < keys.shape[1], weighted_values(log_w[:, :, None], values)[:, 0], jnp.nan)
    return y.astype(v.dtype), KeyValueCache(keys, values, gate, slot + 1)


def power_cache_step(
    q: Float[Array, "batch heads dim"],
    k: Float[Array, "batch heads dim"],
    v: Float[Array, "batch heads dv"],
    log_g: Float[Array, "batch heads"] | None,
    cache: KeyValueCache,
    p: int,
    scale: float,
) -> tuple[Float[Array, "batch heads dv"], KeyValueCache]:
    """One token of gated power attention against the cache: w_j = (s q . k_j)^p exp(G_t - G_j)."""
    return cache_step(q * scale, k, v, log_g, cache, lambda dot: p * log_abs(dot))
