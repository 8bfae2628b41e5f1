"""The symmetric power embedding, and the float64 oracle of ops/sympow/naive.py: the paper's
maths, checked here against loops written out and kept apart from the forms it checks."""

import ast
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import attention_inputs, relative_error

import ops
from ops.sympow import naive
from ops.sympow.embedding import embedding_terms


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
    """The oracle's attention form against w_ij = (s q_i.k_j)^p exp(G_i - G_j), written out."""
    q, k, v, log_g = attention_inputs(1, 9, 2, 4, gamma=0.5)
    s, p = 0.5, 2
    expected = np.zeros(v.shape)
    G = np.cumsum(np.asarray(log_g), axis=1)
    for h in range(2):
        for i in range(9):
            w = np.array([(s * q[0, i, h] @ k[0, j, h]) ** p * np.exp(G[0, i, h] - G[0, j, h]) for j in range(i + 1)])
            expected[0, i, h] = w @ np.asarray(v[0, : i + 1, h]) / w.sum()
    assert relative_error(naive.attention_form(q, k, v, log_g, p, s), expected) < 1e-12


def test_row_without_weight_is_zero_not_nan():
    q, k, v, _ = attention_inputs(1, 5, 1, 4)
    q = q.at[0, 2].set(0.0)
    for impl in ("attention", "recurrent", "chunked"):
        y = ops.sympow_attention(q, k, v, impl=impl, chunk_size=2)
        assert np.all(np.isfinite(y)), impl
        np.testing.assert_array_equal(y[0, 2], 0.0)
        grads = jax.grad(lambda q, impl=impl: jnp.sum(ops.sympow_attention(q, k, v, impl=impl, chunk_size=2)))(q)
        assert np.all(np.isfinite(grads)), impl


def test_the_oracle_imports_nothing_it_checks():
    """naive.py shares no code with the forms it checks: only the standard library, numpy and jax."""
    tree = ast.parse((Path(naive.__file__)).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in imported}
    assert roots <= {"collections", "functools", "itertools", "math", "jax", "numpy"}, roots


@pytest.mark.parametrize("dim, p", [(3, 2), (6, 4), (4, 6)])
def test_the_oracles_phi_is_the_multinomial_expansion_and_the_libraries(dim, p):
    """phi(x) . phi(y) = (x . y)^p for the oracle's phi, written apart from ops' (which must give
    the same features in the same order: that order is the state's layout)."""
    x, y = jax.random.normal(jax.random.key(p), (2, 5, dim), jnp.float64)
    term_scale = (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)) ** p  # as in the first test
    error = jnp.abs(jnp.sum(naive.phi(x, p) * naive.phi(y, p), -1) - jnp.sum(x * y, -1) ** p)
    np.testing.assert_array_less(error, 1e-12 * term_scale)
    np.testing.assert_allclose(ops.sympow_embedding(x, p), naive.phi(x, p), rtol=1e-14)


@pytest.mark.parametrize("gamma", [None, 0.7])
def test_the_oracles_recurrent_form_is_its_attention_form(gamma):
    """The two definitions agree, a state handed over included: S_t, z_t written out as sums."""
    q, k, v, log_g = attention_inputs(1, 12, 2, 3, gamma=gamma, seed=4)
    y, state = naive.recurrent_form(q, k, v, log_g, 2, 0.5)
    assert relative_error(y, naive.attention_form(q, k, v, log_g, 2, 0.5)) < 1e-12
    G = np.zeros(q.shape[:3]) if log_g is None else np.cumsum(np.asarray(log_g), axis=1)
    decay = np.exp(G[:, -1:] - G)  # [batch, seq, heads]
    phi_k = np.asarray(naive.phi(np.sqrt(0.5) * k, 2)) * decay[..., None]
    assert relative_error(state[0], np.einsum("bjhD,bjhv->bhDv", phi_k, v)) < 1e-12
    assert relative_error(state[1], np.sum(phi_k, axis=1)) < 1e-12
    first, second = (
        tuple(None if a is None else a[:, s] for a in (q, k, v, log_g)) for s in (slice(0, 5), slice(5, None))
    )
    _, state_first = naive.recurrent_form(*first, 2, 0.5)
    y_second = naive.attention_form(*second, 2, 0.5, initial_state=state_first)
    assert relative_error(y_second, y[:, 5:]) < 1e-12
