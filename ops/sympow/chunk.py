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
near 1. A state S_0 handed in from earlier tokens enters chunk 0. The stages below are the
ones the Triton kernels implement, though not with their signatures or layout: `chunk_states`,
`state_scan`, `chunk_outputs`; each chunk's work is the attention form's `state_after` or
`attend` on that chunk alone. Chunk-wise work runs one chunk at a time under `jax.checkpoint`,
so the backward pass rematerialises phi features and never holds more than one chunk of them.
`matmul` is the attention form's (ops.sympow.attention_form). Keys, values, gates and states
are per key/value head, queries per query head (ops.sympow.groups).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ops.sympow.attention_form import attend, state_after
from ops.sympow.gate import ChunkGatePair, chunk_local_gates
from ops.sympow.state import SympowState, decay_and_add, empty_state

Chunked = Float[Array, "batch chunks chunk heads dim"]
ChunkedKeys = Float[Array, "batch chunks chunk kv_heads dim"]


def split_chunks(x: Float[Array, "batch seq *rest"], chunk_size: int) -> Float[Array, "batch chunks chunk *rest"]:
    """Pad seq with zeros to a multiple of chunk_size and split it. Zero keys carry no weight
    and zero log-gates no decay, and padding comes after every real token, so it changes nothing."""
    seq = x.shape[1]
    padded = -(-seq // chunk_size) * chunk_size
    x = jnp.pad(x, [(0, 0), (0, padded - seq)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], padded // chunk_size, chunk_size, *x.shape[2:])


def one_chunk_at_a_time(fn, *chunked_args):
    """Map fn over the chunk axis (axis 1), recomputing its insides in the backward pass."""
    outputs = jax.lax.map(jax.checkpoint(lambda args: fn(*args)), tuple(jnp.moveaxis(a, 1, 0) for a in chunked_args))
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), outputs)


def chunk_states(
    k: ChunkedKeys,
    v: Float[Array, "batch chunks chunk kv_heads dv"],
    L: ChunkGatePair,
    p: int,
    scale: float,
    matmul: Callable = jnp.einsum,
) -> tuple[Float[Array, "batch chunks kv_heads D dv"], Float[Array, "batch chunks kv_heads D"]]:
    """What each chunk adds to the state: sum_j exp(L_end - L_j) phi(r k_j) v_j^T, and to z."""

    def one_chunk(k, v, L_hi, L_lo):
        return tuple(state_after(k, v, (L_hi, L_lo), None, p, scale, matmul))

    return one_chunk_at_a_time(one_chunk, k, v, *L)


def state_scan(
    delta_S: Float[Array, "batch chunks kv_heads D dv"],
    delta_z: Float[Array, "batch chunks kv_heads D"],
    L_end: Float[Array, "batch chunks kv_heads"],
    initial_state: SympowState | None = None,
) -> tuple[Float[Array, "batch chunks kv_heads D dv"], Float[Array, "batch chunks kv_heads D"], SympowState]:
    """The states entering each chunk, S_{m+1} = exp(L_end_m) S_m + delta_S_m from S_0 (zero
    unless given; z likewise), and the state after the last chunk."""

    def step(state, chunk):
        dS, dz, l_end = chunk
        return decay_and_add(state, l_end, SympowState(dS, dz)), state

    inputs = tuple(jnp.moveaxis(a, 1, 0) for a in (delta_S, delta_z, L_end))
    if initial_state is None:
        initial_state = SympowState(*(jnp.zeros_like(a[0]) for a in inputs[:2]))
    final, (S, z) = jax.lax.scan(step, initial_state, inputs)
    return jnp.moveaxis(S, 0, 1), jnp.moveaxis(z, 0, 1), final


def chunk_outputs(
    q: Chunked,
    k: ChunkedKeys,
    v: Float[Array, "batch chunks chunk kv_heads dv"],
    L: ChunkGatePair,
    S: Float[Array, "batch chunks kv_heads D dv"],
    z: Float[Array, "batch chunks kv_heads D"],
    p: int,
    scale: float,
    matmul: Callable = jnp.einsum,
    with_log_normaliser: bool = False,
):
    """y_i from the state entering its chunk plus the gated power attention inside the chunk
    (L_i - L_j = G_i - G_j there); with_log_normaliser as in `attend`."""

    def one_chunk(q, k, v, L_hi, L_lo, S, z):
        return attend(q, k, v, (L_hi, L_lo), SympowState(S, z), p, scale, matmul, with_log_normaliser)

    return one_chunk_at_a_time(one_chunk, q, k, v, *L, S, z)


def chunked_form(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq kv_heads dim"],
    v: Float[Array, "batch seq kv_heads dv"],
    log_g: Float[Array, "batch seq kv_heads"] | None,
    p: int,
    scale: float,
    chunk_size: int,
    initial_state: SympowState | None = None,
    matmul: Callable = jnp.einsum,
) -> tuple[Float[Array, "batch seq heads dv"], SympowState]:
    """Gated symmetric power attention in O(T c d + T D d), any seq (padded to whole chunks), from
    the given state (or zero); returns y and the state after the last token (padding adds nothing)."""
    batch, seq, heads, _ = q.shape
    if log_g is None:
        log_g = jnp.zeros(k.shape[:3], k.dtype)
    qc, kc, vc, log_gc = (split_chunks(a, chunk_size) for a in (q, k, v, log_g))
    L = chunk_local_gates(log_gc)
    delta_S, delta_z = chunk_states(kc, vc, L, p, scale, matmul)
    S, z, final = state_scan(delta_S, delta_z, L[0][:, :, -1], initial_state)  # hi alone, as in attend
    y = chunk_outputs(qc, kc, vc, L, S, z, p, scale, matmul)
    return y.reshape(batch, -1, heads, v.shape[-1])[:, :seq], final


def final_state(
    k: Float[Array, "batch seq kv_heads dim"],
    v: Float[Array, "batch seq kv_heads dv"],
    log_g: Float[Array, "batch seq kv_heads"] | None,
    initial_state: SympowState | None,
    p: int,
    scale: float,
    chunk_size: int,
) -> SympowState:
    """The state after the last token alone, chunk after chunk: one D x dv state and one chunk of
    phi features alive at a time (for outputs that came from elsewhere: the Triton kernels)."""
    batch, seq, kv_heads, _ = k.shape
    if log_g is None:
        log_g = jnp.zeros((batch, seq, kv_heads), k.dtype)
    kc, vc, log_gc = (split_chunks(a, chunk_size) for a in (k, v, log_g))
    chunks = tuple(jnp.moveaxis(a, 1, 0) for a in (kc, vc, *chunk_local_gates(log_gc)))
    if initial_state is None:
        initial_state = empty_state(batch, kv_heads, k.shape[-1], v.shape[-1], p, k.dtype)

    @jax.checkpoint
    def step(state, chunk):
        k, v, L_hi, L_lo = chunk
        return state_after(k, v, (L_hi, L_lo), state, p, scale), None

    return jax.lax.scan(step, initial_state, chunks)[0]
