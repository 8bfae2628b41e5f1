"""The attention layer of each of the paper's four variants, and its decoding caches.

A layer runs over a whole sequence (`__call__`, training and evaluation), or in two steps for
inference: `prefill` runs a prompt in one call and returns a cache, `decode` takes one token
and the cache. The cache is the sympow state where it fits (ops.SympowState: constant size
whatever the context), else (softmax, or a state too large to hold) an ops.KeyValueCache of a
fixed maximum length. Both carry the rotary position reached, as an exact pair.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

import ops
from ops.sympow.cache import cache_step, weighted_values
from ops.sympow.groups import grouped
from ops.sympow.numerics import compute_dtype
from sympow.config import ModelConfig
from sympow.layers import INIT_STD, Dense, Gate
from sympow.rotary import LearnedRotary, Position, fixed_angles, positions, rotate, rotation_angles

Pair = tuple[Array, Array]


class StateCache(NamedTuple):
    """A sympow layer's cache: its state, and the rotary position reached."""

    state: ops.SympowState
    position: Position


class KeysCache(NamedTuple):
    """A layer's cache of keys and values (with G for sympow_gated and conformal), and the
    rotary position reached."""

    cache: ops.KeyValueCache
    position: Position


LayerCache = StateCache | KeysCache


def last(pair: Pair) -> Pair:
    return tuple(part[:, -1] for part in pair)


def softmax_attention(q, k, v):
    """Causal softmax attention in at least float32, in v's dtype (jax.nn.dot_product_attention
    computes in float32 even for float64 inputs, and its XLA path is the same O(T^2) computation);
    k and v over key/value heads (ops.sympow.groups)."""
    out_dtype, dtype = v.dtype, compute_dtype(q)
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    seq = q.shape[1]
    log_w = jnp.einsum("bihgd,bjhd->bhgij", grouped(q, k.shape[2]) * (1 / q.shape[-1] ** 0.5), k)
    return weighted_values(jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), log_w, -jnp.inf), v).astype(out_dtype)


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
        # q, then k and v of the key/value heads: with equal heads, the columns of 3 x d_model.
        self.qkv = Dense(config.d_model, config.d_model + 2 * config.kv_heads * config.head_dim, key=qkv_key)
        # GPT-2 scales residual projections by 1/sqrt(2 n_layers).
        self.out = Dense(config.d_model, config.d_model, key=out_key, std=INIT_STD / (2 * config.n_layers) ** 0.5)
        self.gate = (
            Gate(config.d_model, config.kv_heads, key=gate_key, gamma=config.gate_init) if config.gated else None
        )
        self.learned_rotary = LearnedRotary(config.d_model, config.kv_heads) if config.learned_rotary else None

    @property
    def holds_state(self) -> bool:
        """Whether decoding keeps the sympow state (else keys and values)."""
        cfg = self.config
        return cfg.attention != "softmax" and ops.state_fits(cfg.head_dim, cfg.head_dim, cfg.p)

    def beta(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq kv_heads"]:
        """Each token's step in rotary position per key/value head: learned, or 1 for the fixed rotary."""
        if self.learned_rotary is None:
            return jnp.ones((*x.shape[:2], self.config.kv_heads), x.dtype)
        return self.learned_rotary(x)

    def project(self, x: Float[Array, "batch seq d_model"], start: Position | None, real=None):
        """Rotated q and k, v, the log-gates (or None) and the rotary position after these tokens.
        real [batch, seq]: which tokens are a prompt's (the rest padding after it), or None for
        all: padding gets a zero key, value, log-gate and rotary step, so that it adds nothing to
        a state (phi(0) = 0), decays nothing and moves no position (and a zero weight meets a
        finite value)."""
        cfg = self.config
        batch, seq, _ = x.shape
        heads = self.qkv(x).reshape(batch, seq, cfg.n_heads + 2 * cfg.kv_heads, cfg.head_dim)
        q, k, v = jnp.split(heads, [cfg.n_heads, cfg.n_heads + cfg.kv_heads], axis=2)
        beta = self.beta(x)
        if real is not None:
            beta = jnp.where(real[..., None], beta, 0)
            k, v = (jnp.where(real[..., None, None], a, 0) for a in (k, v))
        if self.learned_rotary is None:
            angles = fixed_angles(batch, seq, cfg.kv_heads, cfg.head_dim, cfg.rotary_length, start, beta.dtype)
        else:
            angles = rotation_angles(beta, cfg.head_dim, cfg.rotary_length, start)
        log_g = None if self.gate is None else self.gate(x)
        if real is not None and log_g is not None:
            log_g = jnp.where(real[..., None], log_g, 0)
        query_angles = jnp.repeat(angles, cfg.n_heads // cfg.kv_heads, axis=2)  # query head h: kv head h // group
        return rotate(q, query_angles), rotate(k, angles), v, log_g, last(positions(beta, start))

    def attend(self, q, k, v, log_g, **state):
        cfg = self.config
        if cfg.attention == "softmax":
            return softmax_attention(q, k, v)
        # The gate is a log-sigmoid, <= 0 by construction: no need for ops' host-side check.
        return ops.sympow_attention(
            q, k, v, log_g, p=cfg.p, chunk_size=cfg.chunk_size, impl=cfg.impl, check_log_g=False, **state
        )

    def output(self, y: Float[Array, "batch seq heads dim"]) -> Float[Array, "batch seq d_model"]:
        return self.out(y.reshape(*y.shape[:2], self.config.d_model))

    def __call__(self, x: Float[Array, "batch seq d_model"]) -> Float[Array, "batch seq d_model"]:
        q, k, v, log_g, _ = self.project(x, None)
        return self.output(self.attend(q, k, v, log_g))

    def prefill(
        self, x: Float[Array, "batch seq d_model"], max_length: int, lengths=None
    ) -> tuple[Float[Array, "batch seq d_model"], LayerCache]:
        """The layer over a prompt, and its cache for decoding up to max_length tokens in all
        (a key/value cache holds that many; a state any number). lengths [batch]: row b's prompt
        is its first lengths[b] tokens, the rest padding that its cache does not hold (None: all)."""
        real = None if lengths is None else jnp.arange(x.shape[1], dtype=lengths.dtype)[None, :] < lengths[:, None]
        q, k, v, log_g, position = self.project(x, None, real)
        if self.holds_state:
            y, state = self.attend(q, k, v, log_g, return_state=True)
            return self.output(y), StateCache(state, position)
        keys = ops.key_value_cache(k, v, log_g, max_length, lengths=lengths, check_log_g=False)
        cache = KeysCache(keys, position)
        return self.output(self.attend(q, k, v, log_g)), cache

    def decode(
        self, x: Float[Array, "batch 1 d_model"], cache: LayerCache
    ) -> tuple[Float[Array, "batch 1 d_model"], LayerCache]:
        """One token after those in the cache: its output, and the cache with it added."""
        q, k, v, log_g, position = self.project(x, cache.position)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        log_g = None if log_g is None else log_g[:, 0]
        cfg = self.config
        # The gate is a log-sigmoid, <= 0 by construction: no need for ops' host-side check.
        if isinstance(cache, StateCache):
            y, state = ops.sympow_step(q, k, v, log_g, cache.state, p=cfg.p, check_log_g=False)
            return self.output(y[:, None]), StateCache(state, position)
        if cfg.attention == "softmax":
            y, keys = cache_step(q * (1 / cfg.head_dim**0.5), k, v, None, cache.cache, lambda dot: dot)
        else:
            y, keys = ops.sympow_cache_step(q, k, v, log_g, cache.cache, p=cfg.p, check_log_g=False)
        return self.output(y[:, None]), KeysCache(keys, position)
