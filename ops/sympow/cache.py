"""Decoding against a key/value cache: the keys and values of the tokens so far in slots of a
fixed maximum length, with the cumulative gate G at each as an exact pair (ops.sympow.gate).
For states too large to hold (p = 4 at head dim 64: D = 766,480), where `sympow_step` cannot
run; O(length x dim) a token. Softmax decodes through the same step with its own weights.

Shapes: q [batch, heads, dim], k [batch, kv_heads, dim] and v [batch, kv_heads, dim_v] for the new
token; the cache's k [batch, max_length, kv_heads, dim], v [batch, max_length, kv_heads, dim_v],
gate [batch, max_length, kv_heads] (hi, lo) or None, length [batch]: the cache holds each
key/value head once for its group of query heads (ops.sympow.groups), and each row its own
number of tokens (prompts of different lengths), its next token going into slot length[b].
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ops.exact import add_pairs, pair_difference
from ops.sympow.attention_form import finite_or_zero, log_abs, normalise
from ops.sympow.gate import GatePair, exact_cumulative_gate
from ops.sympow.groups import grouped, ungrouped


class KeyValueCache(NamedTuple):
    """Keys and values of each row's first length[b] tokens, and G at each (None without a gate);
    the slots past a row's length hold nothing it reads."""

    k: Float[Array, "batch max_length kv_heads dim"]
    v: Float[Array, "batch max_length kv_heads dv"]
    gate: GatePair | None
    length: Int[Array, " batch"]


def weighted_values(
    log_w: Float[Array, "batch kv_heads group seq keys"], v: Float[Array, "batch keys kv_heads dv"]
) -> Float[Array, "batch seq heads dv"]:
    """sum_j w_ij v_j / sum_j w_ij from log w (queries grouped), in the frame of each row's
    largest weight (a row with no weight gives 0). Softmax is this with log w_ij = s q_i . k_j."""
    stabiliser = finite_or_zero(jax.lax.stop_gradient(jnp.max(log_w, axis=-1, keepdims=True)))
    w = jnp.exp(log_w - stabiliser)
    y = normalise(jnp.einsum("bhgij,bjhd->bihgd", w, v), jnp.moveaxis(jnp.sum(w, axis=-1), -1, 1))
    return ungrouped(y)


def prompt_cache(
    k: Float[Array, "batch seq kv_heads dim"],
    v: Float[Array, "batch seq kv_heads dv"],
    log_g: Float[Array, "batch seq kv_heads"] | None,
    max_length: int,
    lengths: Int[Array, " batch"] | None = None,
) -> KeyValueCache:
    """The cache after a prompt's tokens, with room for max_length >= seq tokens in all. With
    lengths, row b's prompt is its first lengths[b] tokens: the rest is padding, which its slots
    hold but no step reads (and the next token overwrites)."""
    batch, seq = k.shape[:2]

    def slots(a):
        return jnp.zeros((batch, max_length, *a.shape[2:]), a.dtype).at[:, :seq].set(a)

    gate = None if log_g is None else tuple(slots(part) for part in exact_cumulative_gate(log_g))
    lengths = jnp.full((batch,), seq, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    return KeyValueCache(slots(k), slots(v), gate, lengths)


def cache_step(
    q: Float[Array, "batch heads dim"],
    k: Float[Array, "batch kv_heads dim"],
    v: Float[Array, "batch kv_heads dv"],
    log_g: Float[Array, "batch kv_heads"] | None,
    cache: KeyValueCache,
    log_weight: Callable[[Array], Array],
) -> tuple[Float[Array, "batch heads dv"], KeyValueCache]:
    """Write each row's token into its slot length[b], then y = sum_j w_j v_j / sum_j w_j over
    slots 0..length[b], log w_j = log_weight(q . k_j) + G_t - G_j (G_t = G of the slot before
    plus log_g). Past the cache's last slot the output is NaN, so that an overflow shows."""
    slot = cache.length  # [batch]
    rows = jnp.arange(slot.shape[0])

    def write(buffer, a):
        return buffer.at[rows, slot].set(a.astype(buffer.dtype), mode="drop")  # past the end: nothing

    keys, values = write(cache.k, k), write(cache.v, v)
    log_w = log_weight(jnp.einsum("bhgd,bjhd->bhgj", grouped(q, k.shape[1], axis=1), keys))
    gate = None
    if cache.gate is not None:
        # G of the token before (0 before the first): the new token's G goes on from it.
        previous = tuple(jnp.where((slot > 0)[:, None], part[rows, jnp.maximum(slot - 1, 0)], 0) for part in cache.gate)
        G = add_pairs(previous, (log_g.astype(previous[0].dtype), jnp.zeros_like(previous[0])))
        gate = tuple(write(buffer, part) for buffer, part in zip(cache.gate, G))
        log_w = log_w + jnp.moveaxis(pair_difference(tuple(part[:, None] for part in G), gate), 1, -1)[:, :, None]
    readable = jnp.arange(keys.shape[1], dtype=slot.dtype)[None, :] <= slot[:, None]  # [batch, max_length]
    log_w = jnp.where(readable[:, None, None], log_w, -jnp.inf)
    y = jnp.where((slot < keys.shape[1])[:, None, None], weighted_values(log_w[:, :, :, None], values)[:, 0], jnp.nan)
    return y.astype(v.dtype), KeyValueCache(keys, values, gate, slot + 1)


def power_cache_step(
    q: Float[Array, "batch heads dim"],
    k: Float[Array, "batch kv_heads dim"],
    v: Float[Array, "batch kv_heads dv"],
    log_g: Float[Array, "batch kv_heads"] | None,
    cache: KeyValueCache,
    p: int,
    scale: float,
) -> tuple[Float[Array, "batch heads dv"], KeyValueCache]:
    """One token of gated power attention against the cache: w_j = (s q . k_j)^p exp(G_t - G_j)."""
    return cache_step(q * scale, k, v, log_g, cache, lambda dot: p * log_abs(dot))
