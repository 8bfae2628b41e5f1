"""The attention layer of each of the paper's four variants."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

import ops
from sympow.config import ModelConfig
from sympow.layers import INIT_STD, Dense, Gate
from sympow.rotary import LearnedRotary, fixed_angles, rotate, rotation_angles


class Attention(eqx.Module):
    """Causal multi-head attention: softmax or symmetric power, with the variant's gate and rotary."""

    qkv: Dense
    out: Dense
    gate: Gate | None
    learned_rotary: LearnedRotary | None
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        qkv_key, out_key, gate_key = jax.random.split(key, 3)
        self.config = config
        self.qkv = Dense(config.d_model, 3 * config.d_model, key=qkv_key)
        # GPT-2 scales residual projections by 1/sqrt(2 n_layers).
        self.out = Dense(config.d_model, config.d_model, key=out_key, std=INIT_STD / (2 * config.n_layers) ** 0.5)
        self.gate = Gate(config.d_model, config.n_heads, key=gate_key) if config.gated else None
        self.learned_rotary = LearnedRotary(config.d_model, config.n_heads) if config.learned_rotary else None

    def angles(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq heads half"]:
        cfg = self.config
        if self.learned_rotary is None:
            return fixed_angles(x.shape[0], x.shape[1], cfg.n_heads, cfg.head_dim, cfg.rotary_length)
        return rotation_angles(self.learned_rotary(x), cfg.head_dim, cfg.rotary_length)

    def __call__(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq d_model"]:
        cfg = self.config
        batch, seq, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(batch, seq, 3 * cfg.n_heads, cfg.head_dim), 3, axis=2)
        angles = self.angles(x)
        q, k = rotate(q, angles), rotate(k, angles)
        if cfg.attention == "softmax":
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        else:
            log_g = None if self.gate is None else self.gate(x)
            y = ops.sympow_attention(q, k, v, log_g, p=cfg.p, chunk_size=cfg.chunk_size, impl=cfg.impl)
        return self.out(y.reshape(batch, seq, cfg.d_model))
