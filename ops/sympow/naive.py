"""The maths of symmetric power attention as it reads on paper (docs/maths.md), and only that:
the float64 oracle every form and kernel is tested against.

It shares no code with what it checks (tests/test_naive.py holds it to importing only the
standard library, numpy and jax) and takes none of their numerical care: no log space, no
stabiliser, no exact gate pairs. In float64, on the unit-size inputs of the tests, that care is
not needed; it is what the production forms add to run in float32.

Shapes: q [batch, seq, heads, dim]; k [batch, seq, kv_heads, dim]; v [batch, seq, kv_heads, dim_v];
log_g [batch, seq, kv_heads], log_g = log gamma <= 0, None for no gate; a state is a pair
(S [batch, kv_heads, D, dim_v], z [batch, kv_heads, D]). Query head h reads key/value head
h // (heads / kv_heads), and the gate and the state belong to the key/value head (grouped-query
attention; kv_heads = heads is plain multi-head attention). The scale s multiplies q and k; r = sqrt(s).
"""

import collections
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def multisets(dim: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Every multiset {a_1 <= ... <= a_p} of {0..dim-1}, and its multinomial coefficient
    p! / prod_i c_i!, c_i the number of times i occurs in it."""
    indices = list(itertools.combinations_with_replacement(range(dim), p))
    coefficients = [
        math.factorial(p) / math.prod(math.factorial(c) for c in collections.Counter(index).values())
        for index in indices
    ]
    return np.array(indices, np.int32).reshape(-1, p), np.array(coefficients)


def phi(x, p: int):
    """phi_p(x)_a = sqrt(p! / prod_i c_i!) prod_j x_{a_j}: by the multinomial theorem,
    phi_p(x) . phi_p(y) = (x . y)^p."""
    indices, coefficients = multisets(x.shape[-1], p)
    return jnp.prod(x[..., indices], axis=-1) * jnp.sqrt(jnp.asarray(coefficients, x.dtype))


def cumulative_gate(log_g, like):
    """G_i = sum_{u <= i} log gamma_u ([batch, seq, heads]), 0 without a gate."""
    return jnp.zeros(like.shape[:3], like.dtype) if log_g is None else jnp.cumsum(log_g, axis=1)


def for_query_heads(x, heads: int, axis: int = 2):
    """Each key/value head's keys, values, gate or state (None stays None) repeated for each of
    the query heads of its group, so that query head h finds its key/value head at h."""
    if x is None:
        return None
    return jnp.repeat(x, heads // x.shape[axis], axis=axis)


def divide(numerator, denominator):
    """numerator / denominator, 0 for a row with no weight at all (which has numerator 0)."""
    return numerator / jnp.where(denominator == 0, 1, denominator)[..., None]


def attention_form(q, k, v, log_g, p: int, scale: float, initial_state=None):
    """y_i = sum_{j <= i} w_ij v_j / sum_{j <= i} w_ij with w_ij = (s q_i . k_j)^p exp(G_i - G_j).

    With a state (S_0, z_0) left by earlier tokens, those come before q_1 and weigh
    exp(G_i) phi(r q_i)^T S_0 in the numerator and exp(G_i) phi(r q_i)^T z_0 in the denominator."""
    k, v, log_g = (for_query_heads(a, q.shape[2]) for a in (k, v, log_g))
    seq = q.shape[1]
    G = cumulative_gate(log_g, q)
    causal = jnp.tril(jnp.ones((seq, seq), bool))[None, :, :, None]  # [1, i, j, 1]
    decay = jnp.exp(jnp.where(causal, G[:, :, None] - G[:, None, :], -jnp.inf))  # [batch, i, j, heads]
    w = jnp.einsum("bihd,bjhd->bijh", scale * q, k) ** p * decay
    numerator = jnp.einsum("bijh,bjhv->bihv", w, v)
    denominator = jnp.sum(w, axis=2)
    if initial_state is not None:
        S, z = (for_query_heads(a, q.shape[2], axis=1) for a in initial_state)
        phi_q = phi(math.sqrt(scale) * q, p)
        numerator = numerator + jnp.exp(G)[..., None] * jnp.einsum("bihD,bhDv->bihv", phi_q, S)
        denominator = denominator + jnp.exp(G) * jnp.einsum("bihD,bhD->bih", phi_q, z)
    return divide(numerator, denominator)


def recurrent_form(q, k, v, log_g, p: int, scale: float, initial_state=None):
    """S_t = gamma_t S_{t-1} + phi(r k_t) v_t^T, z_t = gamma_t z_{t-1} + phi(r k_t),
    y_t = phi(r q_t)^T S_t / phi(r q_t)^T z_t, from (S_0, z_0) (zero unless given).
    Returns y and the last state (S_T, z_T). phi(r q) . phi(r k) = (s q . k)^p, so these are
    the attention form's weights. The state is per key/value head, read by each of its query heads."""
    batch, _, kv_heads, dim = k.shape
    r = math.sqrt(scale)
    gamma = jnp.ones(k.shape[:3], k.dtype) if log_g is None else jnp.exp(log_g)
    if initial_state is None:
        D = len(multisets(dim, p)[0])
        initial_state = (
            jnp.zeros((batch, kv_heads, D, v.shape[-1]), v.dtype),
            jnp.zeros((batch, kv_heads, D), v.dtype),
        )

    def step(state, token):
        S, z = state
        q_t, k_t, v_t, gamma_t = token
        S = gamma_t[..., None, None] * S + phi(r * k_t, p)[..., :, None] * v_t[..., None, :]
        z = gamma_t[..., None] * z + phi(r * k_t, p)
        phi_q = phi(r * q_t, p)
        S_q, z_q = (for_query_heads(a, q_t.shape[1], axis=1) for a in (S, z))
        return (S, z), divide(jnp.einsum("bhD,bhDv->bhv", phi_q, S_q), jnp.einsum("bhD,bhD->bh", phi_q, z_q))

    tokens = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, gamma))
    state, y = jax.lax.scan(step, tuple(initial_state), tokens)
    return jnp.moveaxis(y, 0, 1), state


# The chunked form in three stages, as the chunked forms and kernels split the work (seq a
# multiple of the chunk size c). L is G restarted at each chunk: L_t = sum_{u=mc..t} log gamma_u.


def in_chunks(x, chunk: int):
    """[batch, seq, ...] -> [batch, seq / chunk, chunk, ...]."""
    return x.reshape(x.shape[0], x.shape[1] // chunk, chunk, *x.shape[2:])


def chunk_gate(log_g, like, chunk: int):
    """L [batch, chunks, chunk, heads], 0 without a gate."""
    if log_g is None:
        return jnp.zeros(in_chunks(like, chunk).shape[:4], like.dtype)
    return jnp.cumsum(in_chunks(log_g, chunk), axis=2)


def chunk_states(k, v, log_g, p: int, scale: float, chunk: int):
    """What each chunk m adds to the state: sum_{j in m} exp(L_end - L_j) phi(r k_j) v_j^T, and
    the same with 1 for v_j: [batch, chunks, heads, D, dim_v] and [batch, chunks, heads, D]."""
    L = chunk_gate(log_g, k, chunk)
    phi_k = phi(math.sqrt(scale) * in_chunks(k, chunk), p) * jnp.exp(L[:, :, -1:] - L)[..., None]
    return jnp.einsum("bnjhD,bnjhv->bnhDv", phi_k, in_chunks(v, chunk)), jnp.sum(phi_k, axis=2)


def state_scan(added_S, added_z, log_decay, initial_state=None):
    """The state entering each chunk, S_0 (zero unless given) and S_{m+1} = exp(E_m) S_m + added_m,
    E_m = L at chunk m's end (z likewise); and the state after the last chunk."""
    S, z = (
        initial_state if initial_state is not None else (jnp.zeros_like(added_S[:, 0]), jnp.zeros_like(added_z[:, 0]))
    )
    entering = []
    for m in range(added_S.shape[1]):
        entering.append((S, z))
        decay = jnp.exp(log_decay[:, m])  # [batch, heads]
        S, z = decay[..., None, None] * S + added_S[:, m], decay[..., None] * z + added_z[:, m]
    return jnp.stack([s for s, _ in entering], 1), jnp.stack([z for _, z in entering], 1), (S, z)


def chunk_outputs(q, k, v, log_g, S, z, p: int, scale: float, chunk: int):
    """y_i = [exp(L_i) phi(r q_i)^T S_m + sum_{j in m, j <= i} (s q_i . k_j)^p exp(L_i - L_j) v_j]
    / [the same with z_m and 1], S_m and z_m the state entering i's chunk m."""
    k, v, log_g = (for_query_heads(a, q.shape[2]) for a in (k, v, log_g))
    S, z = for_query_heads(S, q.shape[2]), for_query_heads(z, q.shape[2])
    L = chunk_gate(log_g, q, chunk)
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))[None, None, :, :, None]  # [1, 1, i, j, 1]
    decay = jnp.exp(jnp.where(causal, L[:, :, :, None] - L[:, :, None, :], -jnp.inf))
    w = jnp.einsum("bnihd,bnjhd->bnijh", scale * in_chunks(q, chunk), in_chunks(k, chunk)) ** p * decay
    phi_q = phi(math.sqrt(scale) * in_chunks(q, chunk), p) * jnp.exp(L)[..., None]
    numerator = jnp.einsum("bnijh,bnjhv->bnihv", w, in_chunks(v, chunk)) + jnp.einsum("bnihD,bnhDv->bnihv", phi_q, S)
    denominator = jnp.sum(w, axis=3) + jnp.einsum("bnihD,bnhD->bnih", phi_q, z)
    y = divide(numerator, denominator)
    return y.reshape(q.shape[0], -1, *y.shape[3:])


def chunked_form(q, k, v, log_g, p: int, scale: float, chunk: int, initial_state=None):
    """The three stages composed: y and the state after the last token, as recurrent_form's."""
    added_S, added_z = chunk_states(k, v, log_g, p, scale, chunk)
    S, z, final = state_scan(added_S, added_z, chunk_gate(log_g, k, chunk)[:, :, -1], initial_state)
    return chunk_outputs(q, k, v, log_g, S, z, p, scale, chunk), final
