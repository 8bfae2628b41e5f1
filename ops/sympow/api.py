"""Symmetric power attention: one public function over several implementations, with its input checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ops.sympow.attention_form import add_state, attention_form
from ops.sympow.cache import KeyValueCache, power_cache_step, prompt_cache
from ops.sympow.chunk import chunked_form, final_state
from ops.sympow.embedding import embedding_size, symmetric_power_embedding
from ops.sympow.gate import exact_cumulative_gate
from ops.sympow.numerics import compute_dtype
from ops.sympow.recurrent import recurrent_form, recurrent_step
from ops.sympow.state import SympowState, empty_state
from ops.sympow.triton import attention as flash_kernels
from ops.sympow.triton import chunked as chunked_kernels

IMPLS = ("attention", "recurrent", "chunked", "triton", "auto")
DEFAULT_CHUNK_SIZE = 128
# Above this many state elements per head (D x dim_v) the state is too large to hold (p = 4 at
# dim 64: 766480 x 64, 196 MB per head in float32): "auto" uses the attention form, and the forms
# that hold it (recurrent, chunked, a state handed in or out) refuse.
MAX_STATE_ELEMENTS = 2**22
# phi_p enumerates its D multi-indices on the host: past this many it would run out of memory.
MAX_EMBEDDING_SIZE = 2**24


def check_power(p) -> None:
    if isinstance(p, bool) or not isinstance(p, int) or p <= 0 or p % 2:
        raise ValueError(f"p must be a positive even integer (odd powers give negative weights); got {p!r}")


def check_shapes(q, k, v, log_g) -> None:
    """q [batch, seq, heads, dim] over k [batch, seq, kv_heads, dim], v [batch, seq, kv_heads, dim_v]
    and log_g [batch, seq, kv_heads], heads a multiple of kv_heads."""
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, seq, heads, dim]; got shape {q.shape}")
    batch, seq, heads, dim = q.shape
    if k.ndim != 4 or k.shape[:2] != (batch, seq) or k.shape[3] != dim:
        raise ValueError(
            f"k must have q's batch, seq and dim {batch, seq, dim}, as [batch, seq, kv_heads, dim]; got {k.shape}"
        )
    kv_heads = k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"q's {heads} heads must be a multiple of k's {kv_heads} key/value heads (each key/value head "
            "serves a group of heads // kv_heads query heads)"
        )
    if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must be [batch, seq, kv_heads, dim_v] with k's first three sizes {k.shape[:3]}; got {v.shape}"
        )
    if log_g is not None and log_g.shape != k.shape[:3]:
        raise ValueError(
            f"log_g must be [batch, seq, kv_heads] = {k.shape[:3]} (one gate per key/value head); got {log_g.shape}"
        )
    if not q.dtype == k.dtype == v.dtype or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k and v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def state_fits(dim: int, dim_v: int, p: int) -> bool:
    """Whether a state of D x dim_v per head (D = C(dim + p - 1, p)) is small enough to hold."""
    return embedding_size(dim, p) * dim_v <= MAX_STATE_ELEMENTS


def check_state_fits(dim: int, dim_v: int, p: int, needs: str) -> None:
    if not state_fits(dim, dim_v, p):
        D = embedding_size(dim, p)
        raise ValueError(
            f"{needs} holds a state of D x dim_v = {D:,} x {dim_v} per head (D = C({dim} + {p} - 1, {p})), "
            f"more than {MAX_STATE_ELEMENTS:,} elements: too large to hold. Use impl='attention' (or "
            "'triton'), and for decoding a key/value cache"
        )


def check_state(state, batch: int, kv_heads: int, dim: int, dim_v: int, p: int) -> None:
    D = embedding_size(dim, p)
    if not isinstance(state, SympowState):
        raise ValueError(f"a state must be an ops.SympowState(S, z); got {type(state).__name__}")
    if state.S.shape != (batch, kv_heads, D, dim_v) or state.z.shape != (batch, kv_heads, D):
        raise ValueError(
            f"the state must have S [batch, kv_heads, D, dim_v] = {(batch, kv_heads, D, dim_v)} and z "
            f"{(batch, kv_heads, D)} "
            f"(D = C({dim} + {p} - 1, {p})); got S {state.S.shape} and z {state.z.shape}"
        )
    if not state.S.dtype == state.z.dtype or not jnp.issubdtype(state.S.dtype, jnp.floating):
        raise ValueError(f"the state's S and z must share one floating dtype; got {state.S.dtype} and {state.z.dtype}")


def raise_if_positive(any_positive) -> None:
    if any_positive:
        raise ValueError("log_g must be <= 0 (log of a gate in (0, 1]); got a positive value")


def check_log_gate(log_g: Array) -> Array:
    """log_g is log gamma with gamma in (0, 1]: a positive value is an error, also under jit,
    grad, vmap and shard_map (a host callback; equinox.error_if breaks inside shard_map).
    A NaN passes through to a NaN output, which a training loop reports as such."""
    jax.debug.callback(raise_if_positive, jnp.any(log_g > 0))
    return log_g


def choose_impl(impl: str, seq: int, dim: int, p: int, chunk_size: int) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")
    if impl != "auto":
        return impl
    state_size = embedding_size(dim, p)
    # Up to T = D the attention form's T^2 d FLOPs are no more than the chunked form's T D d
    # (measured on CPU: the forward + backward crossover is near T = 2048 for D = 2080).
    if seq <= max(chunk_size, state_size) or state_size * dim > MAX_STATE_ELEMENTS:
        return "attention"
    return "chunked"


def check_scale(scale, dim: int) -> float:
    scale = 1 / math.sqrt(dim) if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number; got {scale!r}")
    return scale


def sympow_attention(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq kv_heads dim"],
    v: Float[Array, "batch seq kv_heads dv"],
    log_g: Float[Array, "batch seq kv_heads"] | None = None,
    *,
    p: int = 2,
    chunk_size: int | None = None,
    scale: float | None = None,
    impl: str = "auto",
    initial_state: SympowState | None = None,
    return_state: bool = False,
    check_log_g: bool = True,
) -> Float[Array, "batch seq heads dv"] | tuple[Float[Array, "batch seq heads dv"], SympowState]:
    """Causal (gated) symmetric power attention: y_i = sum_j w_ij v_j / sum_j w_ij with
    w_ij = (scale q_i . k_j)^p exp(G_i - G_j), G the cumulative sum of log_g.

    Grouped key/value heads: k, v and log_g may have fewer heads than q (kv_heads dividing
    heads); query head h reads key/value head h // (heads // kv_heads), the convention of the
    authors' kernels and flash-linear-attention. The gate and the state belong to the key/value
    head: the state is [batch, kv_heads, ...], read by every query head of its group.

    impl: "attention" (O(T^2)), "recurrent" (token by token with the D x dv state), "chunked"
    (chunks of chunk_size tokens; any seq, padded internally), "triton" (the Triton kernels:
    chunked for p = 2 past one chunk, flash-style otherwise; on a CPU in Triton's interpreter,
    float32 only), or "auto" (attention where
    seq <= max(chunk_size, D) or the D x dim state is too large, else chunked). All are differentiable in
    q, k, v and log_g. Computes in at least float32 and returns v's dtype.

    initial_state: an ops.SympowState left by earlier tokens (from return_state or
    ops.sympow_step), whose tokens count as coming before q; the pure-JAX forms are
    differentiable in it. return_state=True returns (y, state after the last token), the state
    in the compute dtype (float32, or float64 for float64 inputs; float32 with impl="triton").

    check_log_g=False skips the check that log_g <= 0, a host callback, for gates that are <= 0
    by construction (a log-sigmoid): its round trip to the host cost 16% of a decode step of
    the 124m model on a CPU (benchmarks/README.md).
    """
    check_power(p)
    check_shapes(q, k, v, log_g)
    batch, seq, _, dim = q.shape
    kv_heads = k.shape[2]
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    scale = check_scale(scale, dim)
    impl = choose_impl(impl, seq, dim, p, chunk_size)
    with_state = initial_state is not None or return_state
    if initial_state is not None:
        check_state(initial_state, batch, kv_heads, dim, v.shape[-1], p)
    if with_state:
        check_state_fits(dim, v.shape[-1], p, "a state handed in or out")
    elif impl in ("recurrent", "chunked"):
        check_state_fits(dim, v.shape[-1], p, f"impl={impl!r}")

    if log_g is not None and check_log_g:
        log_g = check_log_gate(log_g)
    run = triton_forms if impl == "triton" else jax_forms
    y, state = run(impl, q, k, v, log_g, p, scale, chunk_size, initial_state, return_state)
    return (y.astype(v.dtype), state) if return_state else y.astype(v.dtype)


def cast(dtype, *arrays):
    """Each array, or state, in dtype (None stays None)."""

    def one(a):
        if a is None:
            return None
        if isinstance(a, SympowState):
            return SympowState(*(part.astype(dtype) for part in a))
        return a.astype(dtype)

    return [one(a) for a in arrays]


def jax_forms(impl: str, q, k, v, log_g, p: int, scale: float, chunk_size: int, initial_state, return_state: bool):
    """(y, the state after the last token or None) through a pure-JAX form, in at least float32."""
    q, k, v, log_g, initial_state = cast(compute_dtype(q, *(initial_state or ())), q, k, v, log_g, initial_state)
    if impl == "recurrent":
        return recurrent_form(q, k, v, log_g, p, scale, initial_state)
    if impl == "chunked":
        return chunked_form(q, k, v, log_g, p, scale, chunk_size, initial_state)
    return attention_form(q, k, v, log_g, p, scale, initial_state, return_state)


def triton_forms(impl: str, q, k, v, log_g, p: int, scale: float, chunk_size: int, initial_state, return_state: bool):
    """(y, the state after the last token or None) through the kernels, which read bf16 or float32
    as given and accumulate in float32. Past one chunk, p = 2 takes the chunked kernels; other
    powers (p = 4's state is too large) the flash-style ones. They hold no state in the exact
    layout: a state handed in joins their output through its log-normaliser (attention_form.add_state),
    and the state handed out is summed chunk by chunk in pure JAX (chunk.final_state), so both
    stay differentiable."""
    if p == 2 and q.shape[1] > chunk_size:
        y, log_normaliser = chunked_kernels.chunked(q, k, v, log_g, scale, chunk_size)
    else:
        y, log_normaliser = flash_kernels.attention(q, k, v, log_g, p, scale)
    if initial_state is None and not return_state:
        return y, None
    q, k, v, log_g, initial_state = cast(jnp.float32, q, k, v, log_g, initial_state)
    if initial_state is not None:
        gate = None if log_g is None else exact_cumulative_gate(log_g)
        y = add_state(y.astype(jnp.float32), log_normaliser, q, gate, initial_state, p, scale)
    return y, final_state(k, v, log_g, initial_state, p, scale, chunk_size) if return_state else None


def sympow_step(
    q: Float[Array, "batch heads dim"],
    k: Float[Array, "batch kv_heads dim"],
    v: Float[Array, "batch kv_heads dv"],
    log_g: Float[Array, "batch kv_heads"] | None,
    state: SympowState,
    *,
    p: int = 2,
    scale: float | None = None,
    check_log_g: bool = True,
) -> tuple[Float[Array, "batch heads dv"], SympowState]:
    """One token of decoding in O(D d) per head: S = gamma S + phi(r k) v^T, z = gamma z + phi(r k),
    y = phi(r q)^T S / phi(r q)^T z (r = sqrt(scale)). Returns (y in v's dtype, the new state in
    the state's dtype). Equals sympow_attention over one more token with initial_state=state.
    Grouped heads and check_log_g as in sympow_attention."""
    check_power(p)
    check_shapes(q[:, None], k[:, None], v[:, None], None if log_g is None else log_g[:, None])
    batch, kv_heads, dim = k.shape
    check_state(state, batch, kv_heads, dim, v.shape[-1], p)
    check_state_fits(dim, v.shape[-1], p, "sympow_step")
    scale = check_scale(scale, dim)
    if log_g is None:
        log_g = jnp.zeros((batch, kv_heads), q.dtype)
    elif check_log_g:
        log_g = check_log_gate(log_g)
    y, new_state = recurrent_step(*cast(compute_dtype(q, state.S), q, k, v, log_g, state), p, scale)
    (new_state,) = cast(state.S.dtype, new_state)
    return y.astype(v.dtype), new_state


def check_cache(cache, q, v, log_g) -> None:
    """A cache that a token of q [batch, heads, dim], v [batch, kv_heads, dim_v] (and log_g) can join."""
    if not isinstance(cache, KeyValueCache):
        raise ValueError(f"a cache must be an ops.KeyValueCache (ops.key_value_cache); got {type(cache).__name__}")
    (batch, kv_heads, dim_v), dim = v.shape, q.shape[-1]
    if cache.k.ndim != 4 or cache.k.shape[::2] != (batch, kv_heads) or cache.k.shape[3] != dim:
        raise ValueError(
            f"the cache's k must be [batch, max_length, kv_heads, dim] with {batch, kv_heads, dim}; got {cache.k.shape}"
        )
    if cache.v.shape != (*cache.k.shape[:3], dim_v):
        raise ValueError(f"the cache's v must be {(*cache.k.shape[:3], dim_v)}; got {cache.v.shape}")
    length = jnp.asarray(cache.length)
    if length.shape != (batch,) or not jnp.issubdtype(length.dtype, jnp.integer):
        raise ValueError(
            f"the cache's length must be [batch] = ({batch},) integers, each row's tokens so far; "
            f"got shape {length.shape}, {length.dtype}"
        )
    if (log_g is None) != (cache.gate is None):
        raise ValueError("log_g and the cache's gate must both be given or both be None")


def key_value_cache(
    k: Float[Array, "batch seq kv_heads dim"],
    v: Float[Array, "batch seq kv_heads dv"],
    log_g: Float[Array, "batch seq kv_heads"] | None,
    max_length: int,
    *,
    lengths: Int[Array, " batch"] | None = None,
    check_log_g: bool = True,
) -> KeyValueCache:
    """The key/value cache after a prompt's tokens (seq >= 0), with slots for max_length tokens in
    all, for sympow_cache_step. lengths: prompts of different lengths, right-padded to seq: row b
    holds its first lengths[b] tokens (0..seq; the rest is padding that no step reads) and its
    next token goes to slot lengths[b]. check_log_g as in sympow_attention."""
    check_shapes(k, k, v, log_g)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise ValueError(f"max_length must be a positive integer; got {max_length!r}")
    if k.shape[1] > max_length:
        raise ValueError(f"a prompt of {k.shape[1]} tokens does not fit a key/value cache of {max_length}")
    if lengths is not None:
        check_lengths(lengths, k.shape[0], k.shape[1])
    if log_g is not None and check_log_g:
        log_g = check_log_gate(log_g)
    return prompt_cache(k, v, log_g, max_length, lengths)


def check_lengths(lengths, batch: int, seq: int, shortest: int = 0) -> None:
    """Prompt lengths [batch] of integers in shortest..seq (their values checked where they are
    known, outside jit)."""
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be [batch] = ({batch},) integers; got shape {lengths.shape}, {lengths.dtype}")
    try:
        values = np.asarray(lengths)
    except jax.errors.TracerArrayConversionError:  # under jit: known only when it runs
        return
    if not np.all((values >= shortest) & (values <= seq)):
        raise ValueError(f"lengths must be in {shortest}..{seq} (the padded prompt's length); got {values.tolist()}")


def sympow_cache_step(
    q: Float[Array, "batch heads dim"],
    k: Float[Array, "batch kv_heads dim"],
    v: Float[Array, "batch kv_heads dv"],
    log_g: Float[Array, "batch kv_heads"] | None,
    cache: KeyValueCache,
    *,
    p: int = 2,
    scale: float | None = None,
    check_log_g: bool = True,
) -> tuple[Float[Array, "batch heads dv"], KeyValueCache]:
    """One token of decoding against a key/value cache (ops.key_value_cache), for states too large
    to hold: row b's token is written into slot cache.length[b], and y = sum_j w_j v_j / sum_j w_j
    over slots 0..length[b] with w_j = (scale q . k_j)^p exp(G_t - G_j). Returns (y in v's dtype, the cache
    with the token). O(length x dim) per head; past the cache's last slot y is NaN. Equals
    sympow_attention over the cached tokens and this one. Grouped heads (the cache per key/value
    head) and check_log_g as in sympow_attention."""
    check_power(p)
    check_shapes(q[:, None], k[:, None], v[:, None], None if log_g is None else log_g[:, None])
    check_cache(cache, q, v, log_g)
    if log_g is not None and check_log_g:
        log_g = check_log_gate(log_g)
    return power_cache_step(q, k, v, log_g, cache, p, check_scale(scale, q.shape[-1]))


def zero_state(batch: int, kv_heads: int, dim: int, dim_v: int, *, p: int = 2, dtype=jnp.float32) -> SympowState:
    """The state before any token: S [batch, kv_heads, D, dim_v] and z [batch, kv_heads, D] of
    zeros (one per key/value head: with grouped heads, fewer than the query heads)."""
    check_power(p)
    check_state_fits(dim, dim_v, p, "zero_state")
    return empty_state(batch, kv_heads, dim, dim_v, p, dtype)


def sympow_embedding(x: Float[Array, "*b dim"], p: int) -> Float[Array, "*b D"]:
    """phi_p(x), one feature per non-decreasing multi-index, D = comb(dim + p - 1, p), with
    phi_p(x) . phi_p(y) = (x . y)^p exactly."""
    check_power(p)
    dim, D = x.shape[-1], embedding_size(x.shape[-1], p)
    if D > MAX_EMBEDDING_SIZE:
        raise ValueError(
            f"phi_{p} of dim {dim} has D = C({dim} + {p} - 1, {p}) = {D:,} features, more than "
            f"{MAX_EMBEDDING_SIZE:,}: too many to enumerate"
        )
    return symmetric_power_embedding(x, p)
