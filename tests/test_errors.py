"""Bad input gets a clear error, never a silent wrong answer.

With the suite's jaxtyping hook, a wrong shape or type may be caught by the annotation
checker (a TypeError) before the function's own check; both are errors. The function's
own checks, which users without the hook see, are also called directly."""

import jax
import jax.numpy as jnp
import pytest
from conftest import attention_inputs

import ops
import sympow
from ops.sympow.api import check_shapes, check_state

Q, K, V, LOG_G = attention_inputs(1, 10, 2, 4, gamma=0.9)


@pytest.mark.parametrize("p", [3, 1, 0, -2])
def test_odd_or_non_positive_power(p):
    with pytest.raises(ValueError, match="positive even integer"):
        ops.sympow_attention(Q, K, V, p=p)
    with pytest.raises(ValueError, match="positive even integer"):
        ops.sympow_embedding(Q, p)


@pytest.mark.parametrize(
    "q, k, v, log_g, message",
    [
        (Q[0], K[0], V[0], None, "q must be"),
        (Q, K[:, :5], V, None, "k must have"),
        (Q, K, V[:, :5], None, "v must be"),
        (Q, K, V, LOG_G[:, :5], "log_g must be"),
        (Q, K, V.astype(jnp.float32), None, "share one floating dtype"),
        (Q.astype(jnp.int32), K.astype(jnp.int32), V.astype(jnp.int32), None, "share one floating dtype"),
    ],
)
def test_mismatched_shapes_or_dtypes(q, k, v, log_g, message):
    with pytest.raises(ValueError, match=message):
        check_shapes(q, k, v, log_g)
    with pytest.raises((ValueError, TypeError)):
        ops.sympow_attention(q, k, v, log_g)


@pytest.mark.parametrize("impl", ["attention", "recurrent", "chunked"])
def test_positive_log_gate_is_rejected_also_under_jit(impl):
    bad = LOG_G.at[0, 3, 1].set(0.1)
    with pytest.raises(Exception, match="log_g must be <= 0"):
        ops.sympow_attention(Q, K, V, bad, impl=impl)
    with pytest.raises(Exception, match="log_g must be <= 0"):
        jax.jit(lambda g: ops.sympow_attention(Q, K, V, g, impl=impl))(bad).block_until_ready()
    assert jnp.all(jnp.isnan(ops.sympow_attention(Q, K, V, LOG_G.at[0, 0, 0].set(jnp.nan), impl=impl)[0, :, 0]))


def test_unknown_impl_and_bad_chunk_or_scale():
    with pytest.raises(ValueError, match="unknown impl"):
        ops.sympow_attention(Q, K, V, impl="flash")
    for chunk_size in (0, -4):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            ops.sympow_attention(Q, K, V, chunk_size=chunk_size)
    for scale in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="scale must be"):
            ops.sympow_attention(Q, K, V, scale=scale)


def test_triton_refuses_what_its_kernels_cannot_do():
    with pytest.raises(ValueError, match="head dims of q, k and of v in"):
        ops.sympow_attention(*(a.astype(jnp.float32) for a in (Q, K, V)), impl="triton")  # dim 4
    q16 = jnp.ones((1, 5, 1, 16), jnp.float64)
    with pytest.raises(TypeError, match="float32 only"):
        ops.sympow_attention(q16, q16, q16, impl="triton")
    huge = jax.ShapeDtypeStruct((1, 2**20, 16, 128), jnp.float32)  # 2^31 elements in one batch entry, never allocated
    with pytest.raises(ValueError, match="int32"):
        jax.eval_shape(lambda q: ops.sympow_attention(q, q, q, impl="triton"), huge)


def test_seq_not_a_multiple_of_chunk_size_is_padded_not_rejected():
    y = ops.sympow_attention(Q, K, V, LOG_G, impl="chunked", chunk_size=3)
    assert y.shape == V.shape


def test_bad_model_configs():
    with pytest.raises(ValueError, match="unknown attention"):
        sympow.ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, attention="linear")
    with pytest.raises(ValueError, match="positive even integer"):
        sympow.ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, p=3)
    with pytest.raises(ValueError, match="heads of even size"):
        sympow.ModelConfig(vocab_size=10, d_model=12, n_layers=1, n_heads=4)
    with pytest.raises(ValueError, match="unknown impl"):
        sympow.ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, impl="fast")
    with pytest.raises(ValueError, match="unknown preset"):
        sympow.preset("huge")
    with pytest.raises(ValueError, match="n_layers must be positive"):
        sympow.ModelConfig(vocab_size=10, d_model=8, n_layers=0, n_heads=2)
    for kv_heads in (3, 0, True):  # not a divisor; not positive; a bool, not a count
        with pytest.raises(ValueError, match="must be a positive divisor of n_heads"):
            sympow.ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=kv_heads)


def test_equal_key_value_heads_are_one_config_however_spelled():
    equal = sympow.ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2)
    assert equal == sympow.ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2) and equal.n_kv_heads is None


def test_shape_annotations_are_checked_in_the_suite():
    """The suite's jaxtyping hook is live: an internal function with a mismatched axis fails."""
    from jaxtyping import TypeCheckError

    from ops.sympow.attention_form import attention_form

    with pytest.raises(TypeCheckError):
        attention_form(Q, K, V[:, :5], None, 2, 0.5)


def test_states_too_large_to_hold_are_refused_at_once_naming_D():
    """p = 8 at head dim 64 (D = 10,639,125,640) asked XLA for 2.7 TB in the recurrent form, and
    the chunked form and phi_40 enumerated multi-indices until memory ran out. Shapes only:
    nothing is allocated, and the refusal comes before any work."""
    q = jax.ShapeDtypeStruct((1, 4096, 1, 64), jnp.float32)
    for impl in ("recurrent", "chunked"):
        with pytest.raises(ValueError, match=f"impl='{impl}' holds a state of D x dim_v = 10,639,125,640 x 64"):
            jax.eval_shape(lambda q, impl=impl: ops.sympow_attention(q, q, q, p=8, impl=impl), q)
    with pytest.raises(ValueError, match="766,480 x 64 per head"):
        jax.eval_shape(lambda q: ops.sympow_attention(q, q, q, p=4, return_state=True), q)
    with pytest.raises(ValueError, match="D = C"):
        jax.eval_shape(lambda x: ops.sympow_embedding(x, 40), jax.ShapeDtypeStruct((16,), jnp.float32))
    assert not ops.state_fits(64, 64, 4) and ops.state_fits(64, 64, 2)


def test_bad_states_are_refused():
    _, state = ops.sympow_attention(Q, K, V, LOG_G, return_state=True)
    with pytest.raises(ValueError, match=r"S \[batch, kv_heads, D, dim_v\]"):
        ops.sympow_attention(Q[:, :, :1], K[:, :, :1], V[:, :, :1], initial_state=state)
    with pytest.raises(ValueError, match="ops.SympowState"):
        check_state((state.S, state.z), 1, 2, 4, 4, 2)
