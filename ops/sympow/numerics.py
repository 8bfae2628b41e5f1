"""The numerical rules that every form and kernel shares (docs/maths.md, "Numerics")."""

import jax.numpy as jnp

# The floor of a normaliser. Forms divide by max(denominator, EPS) after dividing both parts by
# a row's stabiliser, which makes the denominator >= 1 wherever the row has any weight: the
# floor only turns a row with no weight into 0 (not NaN), and never changes a defined output.
EPS = 1e-6


def compute_dtype(*arrays):
    """float64 if any input is, else float32: bf16 and float16 inputs are computed in float32."""
    return jnp.float64 if any(a.dtype == jnp.float64 for a in arrays) else jnp.float32
