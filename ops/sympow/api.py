"""Symmetric power attention: one public function over several implementations, with its input checks."""

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ops.sympow.chunk import chunked_form
from ops.sympow.naive import attention_form, embedding_size, recurrent_form, symmetric_power_embedding
from ops.sympow.triton.attention import attention as triton_attention
from ops.sympow.triton.chunked import chunked as triton_chunked

IMPLS = ("attention", "recurrent", "chunked", "triton", "auto")
DEFAULT_CHUNK_SIZE = 128
# Above this many state elements per head (D x dim) the chunked form's state is too large to
# materialise (p = 4 at dim = 64: 766480 x 64), and "auto" uses the attention form instead.
MAX_STATE_ELEMENTS = 2**22


def check_power(p) -> None:
    if isinstance(p, bool) or not isinstance(p, int) or p <= 0 or p % 2:
        raise ValueError(f"p must be a positive even integer (odd powers give negative weights); got {p!r}")


def check_shapes(q, k, v, log_g) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, seq, heads, dim]; got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {q.shape}; got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [batch, seq, heads, dim_v] with q's first three sizes {q.shape[:3]}; got {v.shape}")
    if log_g is not None and log_g.shape != q.shape[:3]:
        raise ValueError(f"log_g must be [batch, seq, heads] = {q.shape[:3]}; got {log_g.shape}")
    if not q.dtype == k.dtype == v.dtype or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k and v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


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


def sympow_attention(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"],
    v: Float[Array, "batch seq heads dv"],
    log_g: Float[Array, "batch seq heads"] | None = None,
    *,
    p: int = 2,
    chunk_size: int | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> Float[Array, "batch seq heads dv"]:
    """Causal (gated) symmetric power attention: y_i = sum_j w_ij v_j / sum_j w_ij with
    w_ij = (scale q_i . k_j)^p exp(G_i - G_j), G the cumulative sum of log_g.

    impl: "attention" (O(T^2)), "recurrent" (token by token with the D x dv state), "chunked"
    (chunks of chunk_size tokens; any seq, padded internally), "triton" (the Triton kernels:
    chunked for p = 2 past one chunk, flash-style otherwise; on a CPU in Triton's interpreter,
    float32 only), or "auto" (attention where
    seq <= max(chunk_size, D) or the D x dim state is too large, else chunked). All are differentiable in
    q, k, v and log_g. Computes in at least float32 and returns v's dtype.
    """
    check_power(p)
    check_shapes(q, k, v, log_g)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number; got {scale!r}")
    impl = choose_impl(impl, q.shape[1], q.shape[-1], p, chunk_size)

    if log_g is not None:
        log_g = check_log_gate(log_g)
    if impl == "triton":
        # The kernels read bf16 or float32 as given and accumulate in float32. Past one chunk,
        # p = 2 takes the chunked kernels; other powers (p = 4's state is too large) the flash-style ones.
        if p == 2 and q.shape[1] > chunk_size:
            return triton_chunked(q, k, v, log_g, scale, chunk_size).astype(v.dtype)
        return triton_attention(q, k, v, log_g, p, scale).astype(v.dtype)
    dtype = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    if log_g is not None:
        log_g = log_g.astype(dtype)
    if impl == "attention":
        y = attention_form(q, k, v, log_g, p, scale)
    elif impl == "recurrent":
        y = recurrent_form(q, k, v, log_g, p, scale)
    else:
        y = chunked_form(q, k, v, log_g, p, scale, chunk_size)
    return y.astype(v.dtype)


def sympow_embedding(x: Float[Array, "*b dim"], p: int) -> Float[Array, "*b D"]:
    """phi_p(x), one feature per non-decreasing multi-index, D = comb(dim + p - 1, p), with
    phi_p(x) . phi_p(y) = (x . y)^p exactly."""
    check_power(p)
    return symmetric_power_embedding(x, p)


