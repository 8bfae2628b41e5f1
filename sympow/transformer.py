"""A GPT-2-like transformer: embedding, LayerNorm, pre-LN blocks, final LayerNorm, tied unembedding."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from sympow.attention import Attention
from sympow.config import ModelConfig
from sympow.layers import INIT_STD, Dense, LayerNorm


class MLP(eqx.Module):
    up: Dense
    down: Dense

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        up_key, down_key = jax.random.split(key)
        hidden = config.mlp_ratio * config.d_model
        self.up = Dense(config.d_model, hidden, key=up_key)
        self.down = Dense(hidden, config.d_model, key=down_key, std=INIT_STD / (2 * config.n_layers) ** 0.5)

    def __call__(self, x: Float[Array, "*b d_model"]) -> Float[Array, "*b d_model"]:
        return self.down(jax.nn.gelu(self.up(x)))


class Block(eqx.Module):
    attention_norm: LayerNorm
    attention: Attention
    mlp_norm: LayerNorm
    mlp: MLP

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        attention_key, mlp_key = jax.random.split(key)
        self.attention_norm = LayerNorm(config.d_model)
        self.attention = Attention(config, key=attention_key)
        self.mlp_norm = LayerNorm(config.d_model)
        self.mlp = MLP(config, key=mlp_key)

    def __call__(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq d_model"]:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Transformer(eqx.Module):
    embedding: Float[Array, "vocab d_model"]
    embedding_norm: LayerNorm
    blocks: list[Block]
    final_norm: LayerNorm
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        embedding_key, *block_keys = jax.random.split(key, config.n_layers + 1)
        self.config = config
        self.embedding = INIT_STD * jax.random.normal(embedding_key, (config.vocab_size, config.d_model), jnp.float32)
        # The paper normalises the token embedding before the first block.
        self.embedding_norm = LayerNorm(config.d_model)
        self.blocks = [Block(config, key=k) for k in block_keys]
        self.final_norm = LayerNorm(config.d_model)

    def __call__(self, tokens: Int[Array, "batch seq"]) -> Float[Array, "batch seq vocab"]:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq]; got shape {tokens.shape}")
        return self.from_embeddings(self.embedding[tokens])

    def from_embeddings(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq vocab"]:
        """The model after the token lookup (differentiable in x, which the causality tests use)."""
        x = self.embedding_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x) @ self.embedding.astype(x.dtype).T
