"""Every implementation of ops.sympow_attention against the float64 oracle (ops/sympow/naive.py), gradients too."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import attention_inputs, output_and_gradients, relative_error

import ops
from ops.sympow import naive

FORMS = ("attention", "recurrent", "chunked")
GATES = [None, 0.999, 0.5, 0.01]


def outputs_and_grads(impl, q, k, v, log_g, p, chunk_size=None):
    """y and the gradients of a non-linear loss of y in (q, k, v, log_g) (in q, k, v without a
    gate), through ops.sympow_attention, or the oracle for impl "oracle"."""
    if impl == "oracle":
        attend = lambda *a: naive.attention_form(*a, p, 1 / math.sqrt(q.shape[-1]))  # noqa: E731
    else:
        attend = lambda *a: ops.sympow_attention(*a, p=p, chunk_size=chunk_size, impl=impl)  # noqa: E731
    # Under jit: one compile of the whole computation, about twice as fast here as op by op.
    y, *grads = jax.jit(lambda *args: output_and_gradients(attend, *args))(q, k, v, log_g)
    return y, [grad for grad in grads if grad is not None]


def assert_agree(impl, q, k, v, log_g, p, chunk_size=None, tolerance=1e-9, reference=None):
    y_ref, grads_ref = reference or outputs_and_grads("oracle", q, k, v, log_g, p)
    y, grads = outputs_and_grads(impl, q, k, v, log_g, p, chunk_size)
    assert y.shape == v.shape and y.dtype == v.dtype
    assert relative_error(y, y_ref) < tolerance
    for name, grad, grad_ref in zip("q k v log_g".split(), grads, grads_ref):
        assert relative_error(grad, grad_ref) < tolerance, name


@pytest.mark.parametrize("impl", FORMS)
@pytest.mark.parametrize("gamma", GATES)
@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("seq", [1, 7, 63, 100])
def test_forms_agree_with_the_oracle(impl, gamma, p, seq):
    assert_agree(impl, *oracle_point(gamma, p, seq), chunk_size=16, reference=oracle_at(gamma, p, seq))


def oracle_point(gamma, p, seq):
    """q, k, v, log_g and p of one point of test_forms_agree_with_the_oracle."""
    return (*attention_inputs(2, seq, 2, 8 if p == 2 else 4, gamma=gamma, seed=seq), p)


@functools.cache
def oracle_at(gamma, p, seq):
    """The oracle's output and gradients at a point, once for the three forms there (the oracle
    took a third to a half of each case's time)."""
    return outputs_and_grads("oracle", *oracle_point(gamma, p, seq))


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 50, 64, 128])
def test_chunked_any_chunk_size(chunk_size):
    """Chunk sizes that divide T (1, 5, 50) and that do not (16, 64), or exceed it (128)."""
    q, k, v, log_g = attention_inputs(1, 100, 2, 8, gamma=0.9, seed=chunk_size)
    assert_agree("chunked", q, k, v, log_g, 2, chunk_size=chunk_size)


def test_value_dim_may_differ_and_p_six():
    q, k, v, log_g = attention_inputs(1, 20, 1, 3, gamma=0.8, dim_v=5)
    assert_agree("chunked", q, k, v, log_g, 6, chunk_size=8)
    assert_agree("recurrent", q, k, v, log_g, 6)


def test_scale_is_used_and_only_matters_in_its_power():
    """A different scale changes nothing in exact arithmetic: w_ij gains a common factor s^p."""
    q, k, v, log_g = attention_inputs(1, 30, 2, 8, gamma=0.9)
    base = ops.sympow_attention(q, k, v, log_g, impl="chunked", chunk_size=8)
    for scale in (0.01, 1.0, 3.0):
        y = ops.sympow_attention(q, k, v, log_g, scale=scale, impl="chunked", chunk_size=8)
        assert relative_error(y, base) < 1e-12


@pytest.mark.parametrize("impl", ["attention", "recurrent", "chunked"])
def test_float32_inputs_give_float32_outputs_close_to_float64(impl):
    q, k, v, log_g = attention_inputs(1, 40, 2, 8, gamma=0.9)
    y64 = ops.sympow_attention(q, k, v, log_g, impl=impl, chunk_size=16)
    y32 = ops.sympow_attention(*(a.astype(jnp.float32) for a in (q, k, v, log_g)), impl=impl, chunk_size=16)
    assert y32.dtype == jnp.float32
    assert relative_error(y32, y64) < 1e-4


@pytest.mark.parametrize("gamma", [0.9, 0.5, 0.01])
@pytest.mark.parametrize("impl", ["chunked", "attention"])
def test_float32_keeps_its_precision_with_strong_gates_over_long_spans(impl, gamma):
    """|G| grows to T |log gamma| (|L| to chunk_size |log gamma| inside a chunk); G_i - G_j of
    nearby positions from one rounded float32 G lost ulp(|G|) in weights near 1. With G and L as
    exact pairs both forms stay at float32 round-off over 2048 tokens (chunk 1024); a rounded G
    failed this by up to 200x (docs/decisions.md)."""
    q, k, v, log_g = attention_inputs(1, 2048, 1, 16, gamma=gamma, seed=3)
    y_ref, grads_ref = outputs_and_grads("oracle", q, k, v, log_g, 2)
    y, grads = outputs_and_grads(impl, *(a.astype(jnp.float32) for a in (q, k, v, log_g)), 2, chunk_size=1024)
    assert relative_error(y, y_ref) < 1e-6
    for name, grad, grad_ref in zip("q k v log_g".split(), grads, grads_ref):
        assert relative_error(grad, grad_ref) < 3e-6, name


def test_auto_picks_attention_for_short_or_wide_and_chunked_otherwise(monkeypatch):
    from ops.sympow import api

    assert api.choose_impl("auto", 64, 64, 2, 128) == "attention"
    assert api.choose_impl("auto", 2000, 64, 2, 128) == "attention"  # T <= D = 2080
    assert api.choose_impl("auto", 4096, 64, 2, 128) == "chunked"
    assert api.choose_impl("auto", 200, 4, 2, 16) == "chunked"  # D = 10
    assert api.choose_impl("auto", 4096, 64, 4, 128) == "attention"  # 766480 x 64 state
    q, k, v, log_g = attention_inputs(1, 40, 1, 2, gamma=0.9)  # D = 3 < 40
    called = []
    monkeypatch.setattr(api, "chunked_form", lambda *a: called.append("chunked") or (a[2], None))
    ops.sympow_attention(q, k, v, log_g, chunk_size=16)
    assert called == ["chunked"]


def test_works_under_jit_and_vmap_over_an_extra_axis():
    q, k, v, log_g = attention_inputs(2, 33, 2, 8, gamma=0.7)
    fn = jax.jit(lambda q, k, v, g: ops.sympow_attention(q, k, v, g, impl="chunked", chunk_size=8))
    y = fn(q, k, v, log_g)
    stacked = jax.vmap(fn)(*(jnp.stack([a, a]) for a in (q, k, v, log_g)))
    np.testing.assert_allclose(stacked[1], y, rtol=1e-12)
    assert relative_error(y, naive.attention_form(q, k, v, log_g, 2, 1 / math.sqrt(8))) < 1e-9
