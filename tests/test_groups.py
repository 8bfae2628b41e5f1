"""Grouped key/value heads: every form with q over 4 heads and k, v, log_g and the state over 2
equals the same computation with each key/value head repeated for its group (jnp.repeat) in the
oracle, output, state after and gradients in q, k, v, log_g and the state handed in: float64 to
1e-9, the Triton kernels (interpreter, float32) by conftest's `within_kernel_rule`."""

import math

import jax
import jax.numpy as jnp
import pytest
from conftest import attention_inputs, relative_error, sine_loss, within_kernel_rule

import ops
from ops.sympow import naive
from ops.sympow.api import check_shapes

BATCH, HEADS, KV_HEADS = 2, 4, 2
GROUP = HEADS // KV_HEADS


def repeated(a, axis: int = 2):
    return None if a is None else jnp.repeat(a, GROUP, axis=axis)


def oracle_by_repetition(q, k, v, log_g, state, p: int):
    """The ungrouped oracle on repeated keys, values, gates and state; the state after is any
    query head's of the group (all equal): the first."""
    y, after = naive.recurrent_form(
        q,
        repeated(k),
        repeated(v),
        repeated(log_g),
        p,
        1 / math.sqrt(q.shape[-1]),
        tuple(repeated(a, 1) for a in state),
    )
    return y, ops.SympowState(*(a[:, ::GROUP] for a in after))


def state_before(k, v, log_g, p: int):
    """A state of KV_HEADS heads left by earlier tokens."""
    return ops.SympowState(*naive.recurrent_form(k, k, v, log_g, p, 1 / math.sqrt(k.shape[-1]))[1])


def outputs_and_gradients(run, q, k, v, log_g, state):
    """y, the state after, and the gradients of a sine loss of both in q, k, v, log_g and the state."""
    (y, after), pullback = jax.vjp(run, (q, k, v, log_g), state)
    cotangents = jax.grad(lambda y, after: sine_loss(y) + sine_loss(after.S) + sine_loss(after.z), argnums=(0, 1))(
        y, after
    )
    gradients, state_gradients = pullback(cotangents)
    return [y, *after, *gradients, *state_gradients]


NAMES = "y S z dq dk dv dlog_g dS0 dz0".split()


def inputs_and_state(seq: int, dim: int, p: int, seed: int, dtype=jnp.float64):
    """Two sequences, so that a key/value head's rows are found across the batch stride too."""
    q = attention_inputs(BATCH, seq, HEADS, dim, seed=seed, dtype=dtype)[0]
    earlier_and_now = attention_inputs(BATCH, 9 + seq, KV_HEADS, dim, gamma=0.7, seed=seed + 1, dtype=dtype)
    k, v, log_g = earlier_and_now[1:]
    state = state_before(*(a[:, :9] for a in (k, v, log_g)), p)
    return q, *(a[:, 9:] for a in (k, v, log_g)), state


@pytest.mark.parametrize("impl", ["attention", "recurrent", "chunked"])
@pytest.mark.parametrize("p", [2, 4])
def test_grouped_heads_equal_repeated_heads_in_every_form(impl, p):
    q, k, v, log_g, state = inputs_and_state(21, 6 if p == 2 else 4, p, seed=p)

    def run(inputs, state):
        return ops.sympow_attention(*inputs, p=p, impl=impl, chunk_size=8, initial_state=state, return_state=True)

    def reference(inputs, state):
        return oracle_by_repetition(*inputs, state, p)

    got = outputs_and_gradients(jax.jit(run), q, k, v, log_g, state)
    expected = outputs_and_gradients(reference, q, k, v, log_g, state)
    for name, a, b in zip(NAMES, got, expected):
        assert a.shape == b.shape and relative_error(a, b) < 1e-9, name


@pytest.mark.parametrize("seq", [40, 12], ids=["chunked-kernels", "flash-kernels"])
def test_grouped_heads_through_the_triton_kernels(seq):
    """The kernels in the interpreter (float32): 40 tokens take the chunked kernels (chunk 16),
    12 the flash ones; against float64 by the 2x rule, the plain float32 chunked form beside them."""
    q, k, v, log_g, state = inputs_and_state(seq, 16, 2, seed=5)

    def run(impl):
        return lambda inputs, state: ops.sympow_attention(
            *inputs, p=2, impl=impl, chunk_size=16, initial_state=state, return_state=True
        )

    as32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)  # noqa: E731
    reference = outputs_and_gradients(run("chunked"), q, k, v, log_g, state)
    plain = outputs_and_gradients(run("chunked"), *as32((q, k, v, log_g, state)))
    kernels = outputs_and_gradients(jax.jit(run("triton")), *as32((q, k, v, log_g, state)))
    for name, got, plain_got, expected in zip(NAMES, kernels, plain, reference):
        assert got.shape == expected.shape and got.dtype == jnp.float32, name
        assert within_kernel_rule(got, plain_got, expected), name


def test_the_oracle_with_groups_is_the_oracle_with_repeated_heads():
    """naive's grouped forms (the state per key/value head) against its ungrouped ones."""
    q, k, v, log_g, state = inputs_and_state(24, 6, 2, seed=11)
    y, after = oracle_by_repetition(q, k, v, log_g, state, 2)
    scale = 1 / math.sqrt(6)
    y_recurrent, after_recurrent = naive.recurrent_form(q, k, v, log_g, 2, scale, tuple(state))
    y_chunked, after_chunked = naive.chunked_form(q, k, v, log_g, 2, scale, 8, tuple(state))
    assert relative_error(naive.attention_form(q, k, v, log_g, 2, scale, tuple(state)), y) < 1e-12
    for got, got_after in ((y_recurrent, after_recurrent), (y_chunked, after_chunked)):
        assert relative_error(got, y) < 1e-12
        assert all(relative_error(a, b) < 1e-12 for a, b in zip(got_after, after))


@pytest.mark.parametrize("p", [2, 4])
def test_grouped_decoding_steps_equal_the_oracle(p):
    """sympow_step (the state per key/value head) and sympow_cache_step (the cache per key/value
    head) token by token after a prompt of 5, against the oracle with repeated heads."""
    q, k, v, log_g, _ = inputs_and_state(9, 4, p, seed=13)
    no_state = ops.zero_state(BATCH, KV_HEADS, 4, 4, p=p, dtype=jnp.float64)
    y_expected = oracle_by_repetition(q, k, v, log_g, no_state, p)[0]
    _, state = ops.sympow_attention(*(a[:, :5] for a in (q, k, v, log_g)), p=p, return_state=True)
    cache = ops.key_value_cache(k[:, :5], v[:, :5], log_g[:, :5], 9)
    assert cache.k.shape[2] == KV_HEADS and state.S.shape[1] == KV_HEADS
    for t in range(5, 9):
        token = (q[:, t], k[:, t], v[:, t], log_g[:, t])
        y_state, state = ops.sympow_step(*token, state, p=p)
        y_cache, cache = ops.sympow_cache_step(*token, cache, p=p)
        assert relative_error(y_state, y_expected[:, t]) < 1e-12, t
        assert relative_error(y_cache, y_expected[:, t]) < 1e-12, t


@pytest.mark.parametrize(
    "shapes, message",
    [
        (dict(k=(1, 5, 3, 4), v=(1, 5, 3, 4), log_g=(1, 5, 3)), "must be a multiple of k's 3 key/value heads"),
        (dict(k=(1, 5, 2, 4), v=(1, 5, 4, 4), log_g=(1, 5, 2)), "v must be"),
        (dict(k=(1, 5, 2, 4), v=(1, 5, 2, 4), log_g=(1, 5, 4)), "one gate per key/value head"),
        (dict(k=(1, 5, 2, 6), v=(1, 5, 2, 4), log_g=(1, 5, 2)), "k must have q's batch, seq and dim"),
    ],
)
def test_bad_groupings_are_refused(shapes, message):
    q = jnp.zeros((1, 5, 4, 4))
    k, v, log_g = (-jnp.ones(shapes[name]) for name in ("k", "v", "log_g"))
    with pytest.raises(ValueError, match=message):
        check_shapes(q, k, v, log_g)
    with pytest.raises((ValueError, TypeError)):  # TypeError: the suite's jaxtyping check comes first
        ops.sympow_attention(q, k, v, log_g)


def test_a_state_of_query_heads_is_refused_with_grouped_heads():
    q, k, v, log_g, _ = inputs_and_state(5, 4, 2, seed=3)
    with pytest.raises(ValueError, match=r"kv_heads, D, dim_v\] = \(2, 2, 10, 4\)"):
        ops.sympow_attention(q, k, v, log_g, initial_state=ops.zero_state(BATCH, HEADS, 4, 4, dtype=jnp.float64))
