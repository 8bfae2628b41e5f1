"""A GPT-2-like transformer: embedding, LayerNorm, pre-LN blocks, final LayerNorm, tied unembedding."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ops.sympow.api import check_lengths
from sympow.attention import Attention, LayerCache
from sympow.config import ModelConfig
from sympow.layers import INIT_STD, Dense, LayerNorm

# One cache per layer (see sympow.attention).
Cache = tuple[LayerCache, ...]


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
    mlp_norm: LayerNorm | None
    mlp: MLP | None  # None for mlp_ratio 0: attention only

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        attention_key, mlp_key = jax.random.split(key)
        self.attention_norm = LayerNorm(config.d_model)
        self.attention = Attention(config, key=attention_key)
        self.mlp_norm = LayerNorm(config.d_model) if config.mlp_ratio else None
        self.mlp = MLP(config, key=mlp_key) if config.mlp_ratio else None

    def __call__(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq d_model"]:
        return self.after_attention(x, self.attention(self.attention_norm(x)))

    def after_attention(
        self, x: Float[Array, "batch seq d_model"], attended: Float[Array, "batch seq d_model"]
    ) -> Float[Array, "batch seq d_model"]:
        x = x + attended
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))

    def prefill(self, x: Float[Array, "batch seq d_model"], max_length: int, lengths=None):
        attended, cache = self.attention.prefill(self.attention_norm(x), max_length, lengths)
        return self.after_attention(x, attended), cache

    def decode(self, x: Float[Array, "batch 1 d_model"], cache):
        attended, cache = self.attention.decode(self.attention_norm(x), cache)
        return self.after_attention(x, attended), cache


class Transformer(eqx.Module):
    embedding: Float[Array, "vocab d_model"]
    shift_embedding: Float[Array, "vocab d_model"] | None  # of the previous token (config.token_shift)
    embedding_norm: LayerNorm
    blocks: list[Block]
    final_norm: LayerNorm
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        embedding_key, shift_key, *block_keys = jax.random.split(key, config.n_layers + 2)
        self.config = config
        self.embedding = INIT_STD * jax.random.normal(embedding_key, (config.vocab_size, config.d_model), jnp.float32)
        shape = (config.vocab_size, config.d_model)
        self.shift_embedding = (
            INIT_STD * jax.random.normal(shift_key, shape, jnp.float32) if config.token_shift else None
        )
        # The paper normalises the token embedding before the first block.
        self.embedding_norm = LayerNorm(config.d_model)
        self.blocks = [Block(config, key=k) for k in block_keys]
        self.final_norm = LayerNorm(config.d_model)

    def __call__(self, tokens: Int[Array, "batch seq"]) -> Float[Array, "batch seq vocab"]:
        return self.from_embeddings(self.lookup(tokens))

    def lookup(self, tokens: Int[Array, "batch seq"]) -> Float[Array, "batch seq d_model"]:
        """Each token's embedding, plus (token shift) the previous token's shift embedding; the first
        position has no previous token and adds nothing."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq]; got shape {tokens.shape}")
        x = self.embedding[tokens]
        if self.shift_embedding is None:
            return x
        previous = self.shift_embedding[tokens[:, :-1]]
        return x + jnp.concatenate([jnp.zeros_like(x[:, :1]), previous], axis=1)

    def unembed(self, x: Float[Array, "*b d_model"]) -> Float[Array, "*b vocab"]:
        return self.final_norm(x) @ self.embedding.astype(x.dtype).T

    def from_embeddings(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq vocab"]:
        """The model after the token lookup (differentiable in x, which the causality tests use)."""
        x = self.embedding_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)

    def prefill(
        self,
        tokens: Int[Array, "batch seq"],
        max_length: int | None = None,
        lengths: Int[Array, " batch"] | None = None,
    ) -> tuple[Float[Array, "batch vocab"], Cache]:
        """Run a prompt in one call: the logits after its last token, and the cache to decode on
        from. max_length (default: the prompt's length) is the most tokens, prompt included, that
        a key/value cache (softmax, or a state too large to hold) will take; a state takes any number.

        lengths: a batch of prompts of different lengths, right-padded to seq: row b's prompt is
        tokens[b, :lengths[b]] (1..seq). Each row's logits are those after its own last token,
        and its cache holds only its prompt (padding adds nothing to a state or a key/value cache),
        so decoding goes on from each row's own position: every row as if prefilled alone."""
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"a prompt must be [batch, tokens] with at least one token; got shape {tokens.shape}")
        if lengths is not None:
            check_lengths(lengths, tokens.shape[0], tokens.shape[1], shortest=1)  # logits after a token
            lengths = jnp.asarray(lengths, jnp.int32)
        if self.config.token_shift:
            raise NotImplementedError("decoding a model with a token shift (the recall models) is not supported yet")
        max_length = tokens.shape[-1] if max_length is None else max_length
        x = self.embedding_norm(self.lookup(tokens))
        cache = []
        for block in self.blocks:
            x, layer_cache = block.prefill(x, max_length, lengths)
            cache.append(layer_cache)
        last = x[:, -1] if lengths is None else x[jnp.arange(x.shape[0]), lengths - 1]
        return self.unembed(last), tuple(cache)

    def decode(self, token: Int[Array, " batch"], cache: Cache) -> tuple[Float[Array, "batch vocab"], Cache]:
        """One token after those in the cache, in a cost independent of how many there were for a
        state (a key/value cache costs their number): its logits and the cache with it added."""
        if token.ndim != 1:
            raise ValueError(f"decode takes one token per batch entry, [batch]; got shape {token.shape}")
        if len(cache) != len(self.blocks):
            raise ValueError(f"the cache holds {len(cache)} layers; this model has {len(self.blocks)}")
        x = self.embedding_norm(self.lookup(token[:, None]))
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block.decode(x, layer_cache)
            new_cache.append(layer_cache)
        return self.unembed(x[:, 0]), tuple(new_cache)
