"""The chunked form of gated symmetric power attention, in pure JAX.

Positions are split into chunks of c tokens. Gates are summed only inside a chunk
(L_t = sum_{u=mc..t} g_u), so every decay factor is exp(<= 0) and nothing overflows.
Per chunk m, with L_end its last L:

    state into chunk m+1:  S_{m+1} = exp(L_end) S_m + sum_{j in m} exp(L_end - L_j) phi(r k_j) v_j^T
    numerator of y_i:      exp(L_i) phi(r q_i)^T S_m + sum_{j in m, j <= i} (s q_i . k_j)^p exp(L_i - L_j) v_j

with r = sqrt(s), so that phi(r q) . phi(r k) = (s q . k)^p and both parts weigh alike,
and the denominators the same with z (and 1 for v). L is carried as an exact pair hi + lo of
floats (ops.exact) and differenced part by part: with strong gates |L| reaches c |log gamma|,
and L_i - L_j of nearby positions taken from one rounded L would lose ulp(|L|) in a weight
near 1. The stages below are the ones the Triton kernels implement, with the same signatures:
`chunk_states`, `state_scan`, `chunk_outputs`. Chunk-wise work runs one chunk at a time under
`jax.checkpoint`, so the backward pass rematerialises phi features and never holds more than
one chunk of them.
"""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ops.exact import exact_cumsum, pair_difference
from ops.sympow.naive import finite_or_zero, log_abs, log_weights, normalise, symmetric_power_embedding

Chunked = Float[Array, "batch chunks chunk heads dim"]
ChunkGates = Float[Array, "batch chunks chunk heads"]
GatePair = tuple[ChunkGates, ChunkGates]


def split_chunks(x: Float[Array, "batch seq *rest"], chunk_size: int) -> Float[Array, "batch chunks chunk *rest"]:
    """Pad seq with zeros to a multiple of chunk_size and split it. Zero keys carry no weight
    and zero log-gates no decay, and padding comes after every real token, so it changes nothing."""
    seq = x.shape[1]
    padded = -(-seq // chunk_size) * chunk_size
    x = jnp.pad(x, [(0, 0), (0, padded - seq)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], padded // chunk_size, chunk_size, *x.shape[2:])


def chunk_local_gates(log_g: ChunkGates) -> GatePair:
    """L_t = sum_{u=mc..t} g_u, the cumulative gate restarted at each chunk, as a pair (hi, lo)."""
    return exact_cumsum(log_g, axis=2)


def state_matmul(subscripts: str, features: Array, other: Array) -> Array:
    """A product with phi features that builds or queries a state: the matmuls the Triton kernels
    run with operands in the inputs' dtype (benchmarks/bf16_state_operands.py rounds them here)."""
    return jnp.einsum(subscripts, features, other)


def one_chunk_at_a_time(fn, *chunked_args):
    """Map fn over the chunk axis (axis 1), recomputing its insides in the backward pass."""
    outputs = jax.lax.map(jax.checkpoint(lambda args: fn(*args)), tuple(jnp.moveaxis(a, 1, 0) for a in chunked_args))
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), outputs)


def chunk_states(
    k: Chunked, v: Float[Array, "batch chunks chunk heads dv"], L: GatePair, p: int, scale: float
) -> tuple[Float[Array, "batch chunks heads D dv"], Float[Array, "batch chunks heads D"]]:
    """What each chunk adds to the state: sum_j exp(L_end - L_j) phi(r k_j) v_j^T, and to z.

    The decay is folded into the key before expansion: phi(exp(u/p) x) = exp(u) phi(x)."""

    def one_chunk(k, v, L_hi, L_lo):
        to_end = pair_difference((L_hi[:, -1:], L_lo[:, -1:]), (L_hi, L_lo))  # [batch, chunk, heads]
        phi_k = symmetric_power_embedding(k * (math.sqrt(scale) * jnp.exp(to_end / p))[..., None], p)
        return state_matmul("bjhD,bjhv->bhDv", phi_k, v), jnp.sum(phi_k, axis=1)

    return one_chunk_at_a_time(one_chunk, k, v, *L)


def state_scan(
    delta_S: Float[Array, "batch chunks heads D dv"],
    delta_z: Float[Array, "batch chunks heads D"],
    L_end: Float[Array, "batch chunks heads"],
) -> tuple[Float[Array, "batch chunks heads D dv"], Float[Array, "batch chunks heads D"]]:
    """The states entering each chunk: S_0 = 0, S_{m+1} = exp(L_end_m) S_m + delta_S_m (z likewise)."""

    def step(carry, chunk):
        S, z = carry
        dS, dz, l_end = chunk
        decay = jnp.exp(l_end)[..., None]
        return (decay[..., None] * S + dS, decay * z + dz), (S, z)

    inputs = tuple(jnp.moveaxis(a, 1, 0) for a in (delta_S, delta_z, L_end))
    zeros = jax.tree.map(lambda a: jnp.zeros_like(a[0]), inputs[:2])
    _, (S, z) = jax.lax.scan(step, zeros, inputs)
    return jnp.moveaxis(S, 0, 1), jnp.moveaxis(z, 0, 1)


def chunk_outputs(
    q: Chunked,
    k: Chunked,
    v: Float[Array, "batch chunks chunk heads dv"],
    L: GatePair,
    S: Float[Array, "batch chunks heads D dv"],
    z: Float[Array, "batch chunks heads D"],
    p: int,
    scale: float,
) -> Float[Array, "batch chunks chunk heads dv"]:
    """y_i from the state entering its chunk plus the gated power attention inside the chunk.

    Both parts are put in one frame, the larger of the intra-chunk row max of
    log w_ij = p log|s q_i . k_j| + L_i - L_j and log of the state's weight exp(L_i) phi(r q_i)^T z,
    so the denominator is >= 1 in that frame."""

    def one_chunk(q, k, v, L_hi, L_lo, S, z):
        by_head = tuple(jnp.moveaxis(part, 1, -1) for part in (L_hi, L_lo))  # [batch, heads, chunk]
        gate = pair_difference(tuple(part[..., :, None] for part in by_head), tuple(part[..., None, :] for part in by_head))
        log_w = log_weights(q, k, None, p, scale) + gate  # L_i - L_j = G_i - G_j inside a chunk
        L = L_hi  # a decay from the chunk's start takes hi alone (hi + lo rounds to it)
        phi_q = symmetric_power_embedding(q * math.sqrt(scale), p)
        state_numerator = state_matmul("bihD,bhDv->bihv", phi_q, S)
        state_denominator = jnp.einsum("bihD,bhD->bih", phi_q, z)
        log_state_weight = L + log_abs(jnp.maximum(state_denominator, 0))

        stabiliser = jnp.maximum(jnp.max(log_w, axis=-1), jnp.moveaxis(log_state_weight, -1, 1))
        stabiliser = finite_or_zero(jax.lax.stop_gradient(stabiliser))  # [batch, heads, chunk]
        w = jnp.exp(log_w - stabiliser[..., None])
        state_factor = jnp.exp(L - jnp.moveaxis(stabiliser, 1, -1))  # [batch, chunk, heads]
        numerator = jnp.einsum("bhij,bjhv->bihv", w, v) + state_factor[..., None] * state_numerator
        denominator = jnp.moveaxis(jnp.sum(w, axis=-1), 1, -1) + state_factor * state_denominator
        return normalise(numerator, denominator)

    return one_chunk_at_a_time(one_chunk, q, k, v, *L, S, z)


def chunked_form(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"],
    v: Float[Array, "batch seq heads dv"],
    log_g: Float[Array, "batch seq heads"] | None,
    p: int,
    scale: float,
    chunk_size: int,
) -> Float[Array, "batch seq heads dv"]:
    """Gated symmetric power attention in O(T c d + T D d), any seq (padded to whole chunks)."""
    batch, seq, heads, _ = q.shape
    if log_g is None:
        log_g = jnp.zeros((batch, seq, heads), q.dtype)
    qc, kc, vc, log_gc = (split_chunks(a, chunk_size) for a in (q, k, v, log_g))
    L = chunk_local_gates(log_gc)
    delta_S, delta_z = chunk_states(kc, vc, L, p, scale)
    S, z = state_scan(delta_S, delta_z, L[0][:, :, -1])  # hi alone, as in chunk_outputs
    y = chunk_outputs(qc, kc, vc, L, S, z, p, scale)
    return y.reshape(batch, -1, heads, v.shape[-1])[:, :seq]
