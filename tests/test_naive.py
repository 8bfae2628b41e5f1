"""The symmetric power embedding and the reference forms of ops/sympow/naive.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import attention_inputs, relative_error

import ops
from ops.sympow.naive import attention_form, embedding_terms


@pytest.mark.parametrize("dim, p", [(1, 2), (3, 2), (8, 2), (64, 2), (5, 4), (16, 4), (4, 6)])
def test_embedding_inner_product_is_power_of_dot_product(dim, p):
    x, y = jax.random.normal(jax.random.key(dim * 10 + p), (2, 7, dim), jnp.float64)
    phi_x, phi_y = ops.sympow_embedding(x, p), ops.sympow_embedding(y, p)
    assert phi_x.shape == (7, math.comb(dim + p - 1, p))
    # The sum over features has terms up to (|x||y|)^p, so that is the scale of its round-off.
    term_scale = (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)) ** p
    np.testing.assert_array_less(jnp.abs(jnp.sum(phi_x * phi_y, -1) - jnp.sum(x * y, -1) ** p), 1e-12 * term_scale)


@pytest.mark.parametrize("dim, p, size", [(64, 2, 2080), (64, 4, 766480), (32, 2, 528), (16, 4, 3876)])
def test_embedding_size(dim, p, size):
    assert ops.embedding_size(dim, p) == size
    indices, weights = embedding_terms(dim, p)
    assert indices.shape == (size, p) and weights.shape == (size,)
    assert np.all(np.diff(indices, axis=1) >= 0), "multi-indices must be non-decreasing"


def test_embedding_keeps_batch_axes_and_dtype():
    x = jnp.ones((2, 3, 4), jnp.float32)
    assert ops.sympow_embedding(x, 2).shape == (2, 3, 10)
    assert ops.sympow_embedding(x, 2).dtype == jnp.float32


def test_attention_form_matches_a_loop_over_positions():
    """The vectorised attention form against w_ij = (s q_i.k_j)^p exp(G_i - G_j), written out."""
    q, k, v, log_g = attention_inputs(1, 9, 2, 4, gamma=0.5)
    s, p = 0.5, 2
    expected = np.zeros(v.shape)
    G = np.cumsum(np.asarray(log_g), axis=1)
    for h in range(2):
        for i in range(9):
            w = np.array([(s * q[0, i, h] @ k[0, j, h]) ** p * np.exp(G[0, i, h] - G[0, j, h]) for j in range(i + 1)])
            expected[0, i, h] = w @ np.asarray(v[0, : i + 1, h]) / w.sum()
    assert relative_error(attention_form(q, k, v, log_g, p, s), expected) < 1e-12


def test_row_without_weight_is_zero_not_nan():
    q, k, v, _ = attention_inputs(1, 5, 1, 4)
    q = q.at[0, 2].set(0.0)
    for impl in ("attention", "recurrent", "chunked"):
        y = ops.sympow_attention(q, k, v, impl=impl, chunk_size=2)
        assert np.all(np.isfinite(y)), impl
        np.testing.assert_array_equal(y[0, 2], 0.0)
        grads = jax.grad(lambda q: jnp.sum(ops.sympow_attention(q, k, v, impl=impl, chunk_size=2)))(q)
        assert np.all(np.isfinite(grads)), impl
