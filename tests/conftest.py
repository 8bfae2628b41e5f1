"""Suite-wide settings: float64 available, strict dtype promotion, shared helpers.

Shapes and dtypes of every annotated function in `ops` and `sympow` are checked by
jaxtyping + beartype through the `--jaxtyping-packages` option in pyproject.toml."""

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


def relative_error(actual, expected, floor: float = 1e-3) -> float:
    """max |actual - expected| / max |expected|: one number per array, scale-free.

    The scale is floored (inputs in these tests are of unit size): a quantity that is zero in
    exact arithmetic, such as d y_1 / d q_1 = 0 because y_1 = v_1, has only round-off to compare."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), floor))


def attention_inputs(batch, seq, heads, dim, *, gamma=None, dtype=jnp.float64, seed=0, dim_v=None):
    """Random q, k, v and log gates with gamma drawn around the given strength (None: no gate).

    q and k lean towards one direction per head. Feature forms get (q . k)^p as a sum of terms
    as large as (|q||k|)^p, so a row whose keys are all nearly orthogonal to its query loses
    digits in any of them (measured: 2e-6 relative in d y / d q at seq 1, p 4, cosine 0.023).
    That is the conditioning of the row, which no algorithm fixes; an indexing or gating
    mistake shows as an O(1) error, which these inputs still catch at 1e-9."""
    keys = jax.random.split(jax.random.key(seed), 5)
    direction = jax.random.normal(keys[4], (heads, dim), dtype)
    q, k = (direction + 0.5 * jax.random.normal(key, (batch, seq, heads, dim), dtype) for key in keys[:2])
    v = jax.random.normal(keys[2], (batch, seq, heads, dim_v or dim), dtype)
    if gamma is None:
        return q, k, v, None
    # Spread each token's gamma over [gamma^2, gamma^0.5] (clipped below 1) so gates vary per token.
    exponent = jax.random.uniform(keys[3], (batch, seq, heads), dtype, 0.5, 2.0)
    return q, k, v, exponent * jnp.log(jnp.asarray(gamma, dtype))


def sine_loss(y):
    """sum sin(3 y), in at least float32 (bf16 outputs are cast up): its gradient in y differs
    from entry to entry (that of sum y would give every row the same incoming gradient)."""
    return jnp.sum(jnp.sin(3 * (y if jnp.finfo(y.dtype).bits >= 32 else y.astype(jnp.float32))))


def output_and_gradients(attend, *args):
    """y = attend(*args) and the gradient of sine_loss(y) in each argument."""
    y, pullback = jax.vjp(attend, *args)
    return (y, *pullback(jax.grad(sine_loss)(y)))


# Float32 round-off of unit-size inputs, as relative_error measures it with its scale floored
# at 1: ~17 float32 ulps.
FLOAT32_ROUNDOFF = 2e-6


def within_kernel_rule(kernel, plain, expected) -> bool:
    """A float32 Triton kernel's result is within twice the error of the pure-JAX form's in
    float32 (both against float64), or within float32 round-off.

    In the interpreter the kernels' matmuls are numpy's, whose float32 rounding depends on the
    machine's BLAS kernel: on the CI machine (AMD EPYC, OPENBLAS_CORETYPE=Haswell) the p = 4 flash
    kernels' dq at dim 64 is off by 1.4e-6 against the pure-JAX form's 5.7e-7 (9.5e-7 with
    OpenBLAS's own choice of kernel), and a gradient that is 0 in exact arithmetic (d y_1 / d q_1,
    as y_1 = v_1) comes out as 1.7e-7: dy . v_1 - dy . y_1, rounded two ways. So errors are
    measured against a scale of at least 1 (the inputs' size, and that of the terms whose
    round-off a zero gradient shows), and FLOAT32_ROUNDOFF always passes."""
    return relative_error(kernel, expected, floor=1.0) <= max(
        2 * relative_error(plain, expected, floor=1.0), FLOAT32_ROUNDOFF
    )
