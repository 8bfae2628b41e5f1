"""Small building blocks with an explicit batch axis: dense layer, LayerNorm, gate."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

# GPT-2's initialisation scale.
INIT_STD = 0.02


class Dense(eqx.Module):
    weight: Float[Array, "d_in d_out"]
    bias: Float[Array, " d_out"]

    def __init__(self, d_in: int, d_out: int, *, key: PRNGKeyArray, std: float = INIT_STD, bias: float = 0.0):
        self.weight = std * jax.random.normal(key, (d_in, d_out), jnp.float32)
        self.bias = jnp.full((d_out,), bias, jnp.float32)

    def __call__(self, x: Float[Array, "*b d_in"]) -> Float[Array, "*b d_out"]:
        return x @ self.weight.astype(x.dtype) + self.bias.astype(x.dtype)


class LayerNorm(eqx.Module):
    scale: Float[Array, " d"]
    shift: Float[Array, " d"]
    eps: float = eqx.field(static=True, default=1e-5)

    def __init__(self, d: int):
        self.scale = jnp.ones((d,), jnp.float32)
        self.shift = jnp.zeros((d,), jnp.float32)

    def __call__(self, x: Float[Array, "*b d"]) -> Float[Array, "*b d"]:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        normed = (x - mean) * jax.lax.rsqrt(variance + self.eps)
        return normed * self.scale.astype(x.dtype) + self.shift.astype(x.dtype)


class Gate(eqx.Module):
    """g_t = log_sigmoid(w_g . x_t + b_g) = log gamma_t <= 0, one per head per token."""

    projection: Dense

    def __init__(self, d_model: int, heads: int, *, key: PRNGKeyArray, gamma: float = 0.999):
        # w_g small and b_g = logit(gamma), so every token's gate starts near gamma.
        bias = math.log(gamma / (1 - gamma))
        self.projection = Dense(d_model, heads, key=key, std=INIT_STD / 10, bias=bias)

    def __call__(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq heads"]:
        return jax.nn.log_sigmoid(self.projection(x))
