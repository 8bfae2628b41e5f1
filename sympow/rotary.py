"""Rotary embeddings: fixed (mu_t = t theta) and learned, data-dependent (mu_t = theta sum_{u<=t} beta_u).

Angles must stay exact to ~1e-4 rad at position 65536 in float32, where theta_0 t alone is
~4e5 rad and float32 resolves only ~0.03 rad. So the position sum_{u<=t} beta_u is accumulated
as an unevaluated pair hi + lo of float32 (an associative scan with error-free additions),
and theta times it is reduced modulo one turn with an error-free product. Gradients do not
go through that arithmetic: they are the plain ones of theta * cumsum(beta).

Decoding carries the position reached as that pair (`Position`) and goes on from it, so the
angle of a token is the same whether it came in a prompt or one at a time. A float64 model
computes all of this in float64 pairs.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ops.exact import add_pairs, exact_cumsum, two_product
from ops.sympow.numerics import compute_dtype

# A position sum_{u<=t} beta_u as an exact pair (hi, lo), per batch entry and head (in the
# model, per key/value head: its query heads rotate with it).
Position = tuple[Float[Array, "batch heads"], Float[Array, "batch heads"]]


def frequencies_in_turns(head_dim: int, rotary_length: int) -> np.ndarray:
    """theta_k / (2 pi) = N^(-2k/d), k = 0..d/2-1, as float32."""
    return (float(rotary_length) ** (-2.0 * np.arange(head_dim // 2) / head_dim)).astype(np.float32)


def fraction(x: Array) -> Array:
    return x - jnp.floor(x)


def positions(
    beta: Float[Array, "batch seq heads"], start: Position | None = None
) -> tuple[Float[Array, "batch seq heads"], Float[Array, "batch seq heads"]]:
    """sum_{u<=t} beta_u (after the position `start` reached before these tokens) as an exact pair."""
    beta = jax.lax.stop_gradient(beta.astype(compute_dtype(beta)))
    hi, lo = exact_cumsum(beta, axis=1)
    if start is None:
        return hi, lo
    return add_pairs((hi, lo), tuple(part[:, None].astype(hi.dtype) for part in start))


def rotation_angles(
    beta: Float[Array, "batch seq heads"], head_dim: int, rotary_length: int, start: Position | None = None
) -> Float[Array, "batch seq heads half"]:
    """mu_t,k = theta_k sum_{u<=t} beta_u, reduced into [0, 2 pi)."""
    dtype = compute_dtype(beta)
    turns_per_step = jnp.asarray(frequencies_in_turns(head_dim, rotary_length), dtype)
    hi, lo = (part[..., None] for part in positions(beta, start))
    product, error = two_product(hi, turns_per_step)
    turns = fraction(fraction(product) + (error + lo * turns_per_step))
    exact = (2 * np.pi) * turns
    # Same value as `exact`, but the gradient of theta * cumsum(beta).
    plain = (2 * np.pi) * jnp.cumsum(beta.astype(dtype), axis=1)[..., None] * turns_per_step
    return exact + (plain - jax.lax.stop_gradient(plain))


def fixed_angles(
    batch: int,
    seq: int,
    heads: int,
    head_dim: int,
    rotary_length: int,
    start: Position | None = None,
    dtype=jnp.float32,
) -> Float[Array, "batch seq heads half"]:
    """mu_t = t theta, t = 1..seq (after `start`): the learned rotary with every beta = 1."""
    return rotation_angles(jnp.ones((batch, seq, heads), dtype), head_dim, rotary_length, start)


def rotate(
    x: Float[Array, "batch seq heads dim"], angles: Float[Array, "batch seq heads half"]
) -> Float[Array, "batch seq heads dim"]:
    """Rotate the pair (x_k, x_{k + d/2}) by angle mu_k."""
    first, second = jnp.split(x, 2, axis=-1)
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


class LearnedRotary(eqx.Module):
    """beta_t = 1 + tanh(w_b . x_t + b_b) in (0, 2), one per head per token.

    Starts at w_b = b_b = 0, where it is exactly the fixed rotary."""

    weight: Float[Array, "d_model heads"]
    bias: Float[Array, " heads"]

    def __init__(self, d_model: int, heads: int):
        self.weight = jnp.zeros((d_model, heads), jnp.float32)
        self.bias = jnp.zeros((heads,), jnp.float32)

    def __call__(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq heads"]:
        return 1 + jnp.tanh(x @ self.weight.astype(x.dtype) + self.bias.astype(x.dtype))
