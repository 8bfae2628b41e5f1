"""The maths of symmetric power attention as it reads on paper (docs/maths.md), and only that:
the float64 oracle every form and kernel is tested against.

It shares no code with what it checks (tests/test_naive.py holds it to importing only the
standard library, numpy and jax) and takes none of their numerical care: no log space, no
stabiliser, no exact gate pairs. In float64, on the unit-size inputs of the tests, that care is
not needed; it is what the production forms add to run in float32.

Shapes: q, k [batch, seq, heads, dim]; v [batch, seq, heads, dim_v]; log_g [batch, seq, heads],
log_g = log gamma <= 0, None for no gate; a state is a pair (S [batch, heads, D, dim_v],
z [batch, heads, D]). The scale s multiplies q and k; r = sqrt(s).
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


def divide(numerator, denominator):
    """numerator / denominator, 0 for a row with no weight at all (which has numerator 0)."""
    return numerator / jnp.where(denominator == 0, 1, denominator)[..., None]


def attention_form(q, k, v, log_g, p: int, scale: float, initial_state=None):
    """y_i = sum_{j <= i} w_ij v_j / sum_{j <= i} w_ij with w_ij = (s q_i . k_j)^p exp(G_i - G_j).

    With a state (S_0, z_0) left by earlier tokens, those come before q_1 and weigh
    exp(G_i) phi(r q_i)^T S_0 in the numerator and exp(G_i) phi(r q_i)^T z_0 in the denominator."""
    seq = q.shape[1]
    G = cumulative_gate(log_g, q)
    causal = jnp.tril(jnp.ones((seq, seq), bool))[None, :, :, None]  # [1, i, j, 1]
    decay = jnp.exp(jnp.where(causal, G[:, :, None] - G[:, None, :], -jnp.inf))  # [batch, i, j, heads]
    w = jnp.einsum("bihd,bjhd->bijh", scale * q, k) ** p * decay
    numerator = jnp.einsum("bijh,bjhv->bihv", w, v)
    denominator = jnp.sum(w, axis=2)
    if initial_state is not None:
        S, z = initial_state
        phi_q = phi(math.sqrt(scale) * q, p)
        numerator = numerator + jnp.exp(G)[..., None] * jnp.einsum("bihD,bhDv->bihv", phi_q, S)
        denominator = denominator + jnp.exp(G) * jnp.einsum("bihD,bhD->bih", phi_q, z)
    return divide(numerator, denominator)


def recurrent_form(q, k, v, log_g, p: int, scale: float, initial_state=None):
    """S_t = gamma_t S_{t-1} + phi(r k_t) v_t^T, z_t = gamma_t z_{t-1} + phi(r k_t),
    y_t = phi(r q_t)^T S_t / phi(r q_t)^T z_t, from (S_0, z_0) (zero unless given).
    Returns y and the last state (S_T, z_T). phi(r q) . phi(r k) = (s q . k)^p, so these are
    the attention form's weights."""
    batch, _, heads, dim = q.shape
    r = math.sqrt(scale)
    gamma = jnp.ones(q.shape[:3], q.dtype) if log_g is None else jnp.exp(log_g)
    if initial_state is None:
        D = len(multisets(dim, p)[0])
        initial_state = (jnp.zeros((batch, heads, D, v.shape[-1]), v.dtype), jnp.zeros((batch, heads, D), v.dtype))

    def step(state, token):
        S, z = state
        q_t, k_t, v_t, gamma_t = token
        S = gamma_t[..., None, None] * S + phi(r * k_t, p)[..., :, None] * v_t[..., None, :]
        z = gamma_t[..., None] * z + phi(r * k_t, p)
        phi_q = phi(r * q_t, p)
        return (S, z), divide(jnp.einsum("bhD,bhDv->bhv", phi_q, S), jnp.einsum("bhD,bhD->bh", phi_q, z))

    tokens = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, gamma))
    state, y = jax.lax.scan(step, tuple(initial_state), tokens)
    return jnp.moveaxis(y, 0, 1), state
