"""Error-free float32 arithmetic: pairs hi + lo hold what a float32 running sum would lose."""

import jax
import jax.numpy as jnp
import numpy as np

from ops.exact import exact_cumsum, two_product, two_sum


def test_two_sum_and_two_product_are_exact():
    a, b = (jax.random.normal(key, (1000,), jnp.float32) * 1e3 for key in jax.random.split(jax.random.key(0), 2))
    for result, error, exact in (
        (*two_sum(a, b), np.float64(a) + np.float64(b)),
        (*two_product(a, b), np.float64(a) * np.float64(b)),
    ):
        np.testing.assert_array_equal(np.float64(result) + np.float64(error), exact)


def test_exact_cumsum_keeps_what_a_float32_cumsum_loses():
    """A cumulative gate at 65536 tokens with strong gates: |G| ~ 3e5, where float32 resolves
    0.03; hi + lo matches the float64 sum of the same float32 inputs to 1e-9 relative."""
    log_g = jnp.log(jax.random.uniform(jax.random.key(1), (2, 65536, 3), jnp.float32, 0.005, 0.02))
    exact = np.cumsum(np.float64(log_g), axis=1)
    hi, lo = exact_cumsum(log_g, axis=1)
    assert hi.dtype == lo.dtype == jnp.float32
    assert np.max(np.abs(np.float64(hi) + np.float64(lo) - exact) / np.abs(exact)) < 1e-9
    assert np.max(np.abs(np.float64(jnp.cumsum(log_g, axis=1)) - exact) / np.abs(exact)) > 1e-7
