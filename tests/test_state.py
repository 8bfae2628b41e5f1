"""The recurrent state as an API: handed over between calls, one token at a time, in float64
against one call over all the tokens; prefix invariance of every impl."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import attention_inputs, relative_error, sine_loss, within_kernel_rule

import ops
from ops.sympow import naive
from ops.sympow.api import check_cache

IMPLS = ("attention", "recurrent", "chunked")
CHUNK = 8


def split_at(arrays, at):
    return [None if a is None else a[:, :at] for a in arrays], [None if a is None else a[:, at:] for a in arrays]


# Jitted: eager, the scans' small ops would be dispatched one by one.
attend_and_return_state = jax.jit(ops.sympow_attention, static_argnames=("p", "impl", "chunk_size", "return_state"))


def attend(inputs, p, impl, initial_state=None):
    return attend_and_return_state(
        *inputs, p=p, impl=impl, chunk_size=CHUNK, return_state=True, initial_state=initial_state
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gamma", [None, 0.5])
@pytest.mark.parametrize("p", [2, 4])
def test_two_calls_with_the_state_handed_over_equal_one_call(impl, gamma, p):
    """Splits inside a chunk (5) and on a chunk boundary (16); the state every impl returns is
    the oracle's recurrent form's."""
    dim = 4 if p == 4 else 6
    inputs = attention_inputs(2, 27, 2, dim, gamma=gamma, seed=p)
    y_whole, state_whole = attend(inputs, p, impl)
    _, state_reference = naive.recurrent_form(*inputs, p, 1 / dim**0.5)
    for name, got, expected in zip("Sz", state_whole, state_reference):
        assert got.shape == expected.shape and relative_error(got, expected) < 1e-12, name
    for at in (5, 16):
        first, second = split_at(inputs, at)
        y_first, state = attend(first, p, impl)
        y_second, state = attend(second, p, impl, initial_state=state)
        assert relative_error(jnp.concatenate([y_first, y_second], axis=1), y_whole) < 1e-12, at
        for name, got, expected in zip("Sz", state, state_whole):
            assert relative_error(got, expected) < 1e-12, (at, name)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradients_into_the_initial_state_match_finite_differences(impl):
    first, second = split_at(attention_inputs(1, 20, 2, 4, gamma=0.7, seed=3), 7)
    _, state = attend(first, 2, impl)
    direction = ops.SympowState(*(jax.random.normal(jax.random.key(i), a.shape, a.dtype) for i, a in enumerate(state)))
    weights = jax.random.normal(jax.random.key(9), second[2].shape, jnp.float64)

    def loss(state):
        y, after = attend(second, 2, impl, initial_state=state)
        return jnp.sum(jnp.sin(3 * y) * weights) + jnp.sum(jnp.tanh(after.S)) + jnp.sum(jnp.tanh(after.z))

    gradient = jax.grad(loss)(state)
    along = sum(jnp.vdot(g, d) for g, d in zip(gradient, direction))
    h = 1e-6
    shifted = lambda sign: ops.SympowState(*(a + sign * h * d for a, d in zip(state, direction)))  # noqa: E731
    finite_difference = (loss(shifted(1)) - loss(shifted(-1))) / (2 * h)
    assert abs(along - finite_difference) < 1e-7 * max(1.0, abs(finite_difference)), (along, finite_difference)


@pytest.mark.parametrize("gamma", [None, 0.9])
def test_one_step_equals_one_more_token(gamma):
    q, k, v, log_g = attention_inputs(2, 12, 3, 4, gamma=gamma, seed=5, dim_v=5)
    _, state = ops.sympow_attention(
        q[:, :11],
        k[:, :11],
        v[:, :11],
        None if log_g is None else log_g[:, :11],
        impl="chunked",
        chunk_size=4,
        return_state=True,
    )
    y_all, state_all = ops.sympow_attention(q, k, v, log_g, impl="attention", return_state=True)
    token = (q[:, 11], k[:, 11], v[:, 11], None if log_g is None else log_g[:, 11])
    for step in (ops.sympow_step, jax.jit(ops.sympow_step)):
        y, state_after = step(*token, state)
        assert y.shape == (2, 3, 5) and relative_error(y, y_all[:, 11]) < 1e-12
        for got, expected in zip(state_after, state_all):
            assert relative_error(got, expected) < 1e-12


@pytest.mark.parametrize("p, gamma", [(2, None), (2, 0.9), (4, 0.5)])
def test_cache_steps_equal_the_oracle_token_by_token(p, gamma):
    """A key/value cache filled by a prompt of 5 tokens, then 4 steps (the last one fills it):
    each step's y is the oracle's at that position; a fifth step overflows to NaN."""
    q, k, v, log_g = attention_inputs(2, 9, 3, 4, gamma=gamma, seed=7, dim_v=5)
    expected = naive.attention_form(q, k, v, log_g, p, 0.5)
    cache = ops.key_value_cache(k[:, :5], v[:, :5], None if log_g is None else log_g[:, :5], max_length=9)
    step = jax.jit(functools.partial(ops.sympow_cache_step, p=p, scale=0.5))
    for t in range(5, 10):
        token = tuple(None if a is None else a[:, min(t, 8)] for a in (q, k, v, log_g))
        y, cache = step(*token, cache)
        if t < 9:
            assert y.shape == (2, 3, 5) and relative_error(y, expected[:, t]) < 1e-12, t
    assert np.all(np.isnan(y)) and np.all(cache.length == 10)


def test_bad_cache_steps_are_refused():
    q, k, v, log_g = attention_inputs(1, 3, 1, 4, gamma=0.9)
    cache = ops.key_value_cache(k, v, log_g, max_length=4)
    token = (q[:, 0], k[:, 0], v[:, 0])
    with pytest.raises(ValueError, match="must both be given"):
        ops.sympow_cache_step(*token, None, cache)
    with pytest.raises(ValueError, match="ops.KeyValueCache"):  # the suite's type checks come first
        check_cache(tuple(cache), *token[::2], log_g)
    with pytest.raises(ValueError, match="does not fit"):
        ops.key_value_cache(k, v, log_g, max_length=2)
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        ops.key_value_cache(k, v, log_g, max_length=0)
    with pytest.raises(ValueError, match="cache's k must be"):
        two_heads = attention_inputs(1, 1, 2, 4, gamma=0.9)  # the cache has one head
        ops.sympow_cache_step(*(a[:, 0] for a in two_heads), cache)
    with pytest.raises(ValueError, match="log_g must be <= 0"):
        ops.key_value_cache(k, v, -log_g, max_length=4)
    for length in (jnp.int32(3), jnp.array([3.0])):  # one length for the batch (no row's own); not integers
        with pytest.raises(ValueError, match=r"cache's length must be \[batch\] = \(1,\) integers"):
            check_cache(cache._replace(length=length), *token[::2], log_g)


def test_state_is_float32_at_least():
    q, k, v = (a.astype(jnp.bfloat16) for a in attention_inputs(1, 20, 1, 4)[:3])
    y, state = ops.sympow_attention(q, k, v, impl="chunked", chunk_size=8, return_state=True)
    assert y.dtype == jnp.bfloat16 and state.S.dtype == state.z.dtype == jnp.float32
    assert ops.zero_state(1, 1, 4, 4, p=2).S.shape == (1, 1, 10, 4)


def test_ungated_state_over_65536_tokens_keeps_float32_precision():
    """A raw state has no row max: S and z grow as T with no gate. Summed over 65,536 tokens in
    float32 (chunk by chunk), they and the output read from them stay at float32 round-off."""
    q, k, v, _ = attention_inputs(1, 65536, 1, 8, seed=11)
    as32 = [a.astype(jnp.float32) for a in (q, k, v)]
    run = jax.jit(lambda q, k, v: ops.sympow_attention(q, k, v, impl="chunked", chunk_size=1024, return_state=True))
    _, state64 = run(q, k, v)
    _, state32 = run(*as32)
    q_next = q[:, -1]
    y64, _ = ops.sympow_step(q_next, k[:, -1], v[:, -1], None, state64)
    y32, _ = ops.sympow_step(q_next.astype(jnp.float32), as32[1][:, -1], as32[2][:, -1], None, state32)
    assert relative_error(state32.z, state64.z) < 1e-5 and relative_error(state32.S, state64.S) < 1e-5
    assert relative_error(y32, y64) < 1e-5


@pytest.mark.parametrize("impl, gamma", [(impl, gamma) for impl in IMPLS for gamma in (None, 0.8)] + [("triton", 0.8)])
def test_outputs_before_p_ignore_every_later_input(impl, gamma):
    """Changing q, k, v or log_g at positions >= P leaves y before P unchanged, bit for bit
    (the Triton kernels in the interpreter: the chunked ones, P inside the second chunk)."""
    dtype = jnp.float32 if impl == "triton" else jnp.float64
    inputs = [None if a is None else a.astype(dtype) for a in attention_inputs(1, 40, 2, 16, gamma=gamma, seed=7)]
    P = 19
    later = [None if a is None else a.at[:, P:].set(1.7 * a[:, P:] - 0.1) for a in inputs]
    for i in range(4 if gamma else 3):
        changed = list(inputs)
        changed[i] = later[i]
        before, after = (ops.sympow_attention(*x, impl=impl, chunk_size=16)[:, :P] for x in (inputs, changed))
        np.testing.assert_array_equal(before, after, err_msg="qkvg"[i])


@pytest.mark.parametrize("p, seq, split", [(2, 56, 20), (4, 30, 18)], ids=["chunked-kernels", "flash-kernels"])
def test_triton_takes_and_gives_the_same_state(p, seq, split):
    """The kernels in the interpreter (float32), the state handed in and out in the exact layout:
    y, the state after, and the gradients of both in q, k, v, log_g and the state handed in,
    against float64 by conftest's `within_kernel_rule`.
    The second call runs the chunked kernels (36 tokens, chunk 16) or the flash ones (12)."""
    first, second = split_at(attention_inputs(1, seq, 2, 16, gamma=0.8, seed=p), split)
    _, state = ops.sympow_attention(*first, p=p, impl="chunked", chunk_size=16, return_state=True)

    def outputs_and_gradients(impl, inputs, state):
        def run(inputs, state):
            y, after = ops.sympow_attention(
                *inputs, p=p, impl=impl, chunk_size=16, initial_state=state, return_state=True
            )
            return y, after

        (y, after), pullback = jax.vjp(jax.jit(run), inputs, state)
        cotangents = jax.grad(lambda y, after: sine_loss(y) + sine_loss(after.S) + sine_loss(after.z), argnums=(0, 1))(
            y, after
        )
        gradients, state_gradients = pullback(cotangents)
        return [y, *after, *gradients, *state_gradients]

    as32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)  # noqa: E731
    reference = outputs_and_gradients("chunked", second, state)
    plain = outputs_and_gradients("chunked", as32(second), as32(state))
    kernels = outputs_and_gradients("triton", as32(second), as32(state))
    for name, got, plain_got, expected in zip("y S z dq dk dv dlog_g dS0 dz0".split(), kernels, plain, reference):
        assert got.dtype == jnp.float32 and np.all(np.isfinite(got)), name
        assert within_kernel_rule(got, plain_got, expected), name
