"""The attention form in log space: the production form for short sequences, for states too
large to hold, and for each chunk of the chunked form (ops.sympow.chunk). Its maths is
docs/maths.md's; the float64 oracle it is tested against is ops/sympow/naive.py.

Shapes: q [batch, seq, heads, dim]; k [batch, seq, kv_heads, dim]; v [batch, seq, kv_heads, dim_v];
log_g [batch, seq, kv_heads]; a state per key/value head. Query head h reads key/value head
h // (heads // kv_heads) (ops.sympow.groups); inside, queries are grouped [batch, seq, kv_heads,
group, dim]. Scale s multiplies q and k; r = sqrt(s), so that phi(r q) . phi(r k) = (s q . k)^p.

Numerics (docs/maths.md, "Numerics"): weights are taken in log space against the row max, as
flash attention takes softmax scores, so the denominator is >= 1 wherever a row has any weight
and dividing by max(denominator, EPS) never changes a well-defined output; a row with no
weight gives 0, not NaN (ops.sympow.numerics.EPS). The cumulative gate G is an exact pair
hi + lo (ops.sympow.gate).

`matmul` is the product that builds or queries a state from phi features (jnp.einsum); the
bf16 study in benchmarks/bf16_state_operands.py passes one that rounds its operands, as the
Triton kernels do.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ops.exact import pair_difference
from ops.sympow.embedding import symmetric_power_embedding
from ops.sympow.gate import GatePair, exact_cumulative_gate
from ops.sympow.groups import grouped, ungrouped
from ops.sympow.numerics import EPS
from ops.sympow.state import SympowState, decay_and_add


def log_abs(x: Array) -> Array:
    """log|x|, -inf at 0, with a zero (not NaN) gradient where x == 0."""
    is_zero = x == 0
    safe = jnp.where(is_zero, jnp.ones_like(x), jnp.abs(x))
    return jnp.where(is_zero, -jnp.inf, jnp.log(safe))


def finite_or_zero(stabiliser: Array) -> Array:
    """A row max that is -inf (the row has no weight) becomes 0, so exp(-inf - 0) = 0, not NaN."""
    return jnp.where(jnp.isfinite(stabiliser), stabiliser, jnp.zeros_like(stabiliser))


def normalise(numerator: Float[Array, "*b dv"], denominator: Float[Array, "*b"]) -> Float[Array, "*b dv"]:
    """y = numerator / denominator, both already divided by a stabiliser (see module docstring)."""
    return numerator / jnp.maximum(denominator, EPS)[..., None]


def log_weights(
    q: Float[Array, "batch seq kv_heads group dim"],
    k: Float[Array, "batch seq kv_heads dim"],
    gate: GatePair | None,
    p: int,
    scale: float,
) -> Float[Array, "batch kv_heads group seq seq"]:
    """log w_ij = p log|s q_i . k_j| + G_i - G_j for j <= i, -inf for j > i (q grouped)."""
    seq = q.shape[1]
    log_w = p * log_abs(jnp.einsum("bihgd,bjhd->bhgij", q * scale, k))
    if gate is not None:
        G = tuple(jnp.moveaxis(part, 1, -1)[:, :, None] for part in gate)  # [batch, kv_heads, 1, seq]
        log_w = log_w + pair_difference(
            tuple(part[..., :, None] for part in G), tuple(part[..., None, :] for part in G)
        )
    return jnp.where(jnp.tril(jnp.ones((seq, seq), dtype=bool)), log_w, -jnp.inf)


def query_state(
    q: Float[Array, "batch seq kv_heads group dim"],
    gate: GatePair | None,
    state: SympowState,
    p: int,
    scale: float,
    matmul: Callable = jnp.einsum,
):
    """phi(r q_i)^T S and phi(r q_i)^T z, and log exp(G_i) phi(r q_i)^T z, the state's log weight
    in y_i (-inf where it has none); with G_i [batch, seq, kv_heads, 1], which a decay from the
    first token takes as hi alone (hi + lo rounds to it). q grouped, the state per key/value head."""
    G = (jnp.zeros(q.shape[:3], q.dtype) if gate is None else gate[0])[..., None]
    phi_q = symmetric_power_embedding(q * math.sqrt(scale), p)
    numerator = matmul("bihgD,bhDv->bihgv", phi_q, state.S)
    denominator = jnp.einsum("bihgD,bhD->bihg", phi_q, state.z)
    return G, numerator, denominator, G + log_abs(jnp.maximum(denominator, 0))


def attend(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq kv_heads dim"],
    v: Float[Array, "batch seq kv_heads dv"],
    gate: GatePair | None,
    state: SympowState | None,
    p: int,
    scale: float,
    matmul: Callable = jnp.einsum,
    with_log_normaliser: bool = False,
):
    """y_i = (sum_{j<=i} w_ij v_j + exp(G_i) phi(r q_i)^T S) / (sum_{j<=i} w_ij + exp(G_i) phi(r q_i)^T z),
    w_ij = (s q_i . k_j)^p exp(G_i - G_j), in log space: both parts are put in one frame, the
    larger of the row max of log w and log exp(G_i) phi(r q_i)^T z, so the denominator is >= 1
    there. G counts from the first of these tokens (a chunk's start, in the chunked form).
    with_log_normaliser: (y, the log of the denominator [batch, seq, heads], -inf for a row with
    no weight), as the Triton kernels give it."""
    q = grouped(q, k.shape[2])
    log_w = log_weights(q, k, gate, p, scale)
    stabiliser = jnp.moveaxis(jnp.max(log_w, axis=-1), -1, 1)  # [batch, seq, kv_heads, group]
    if state is not None:
        G, state_numerator, state_denominator, log_state_weight = query_state(q, gate, state, p, scale, matmul)
        stabiliser = jnp.maximum(stabiliser, log_state_weight)
    stabiliser = finite_or_zero(jax.lax.stop_gradient(stabiliser))
    w = jnp.exp(log_w - jnp.moveaxis(stabiliser, 1, -1)[..., None])
    numerator = jnp.einsum("bhgij,bjhv->bihgv", w, v)
    denominator = jnp.moveaxis(jnp.sum(w, axis=-1), -1, 1)  # [batch, seq, kv_heads, group]
    if state is not None:
        state_factor = jnp.exp(G - stabiliser)
        numerator = numerator + state_factor[..., None] * state_numerator
        denominator = denominator + state_factor * state_denominator
    y = ungrouped(normalise(numerator, denominator))
    if not with_log_normaliser:
        return y
    return y, ungrouped(stabiliser + log_abs(denominator))


def add_state(
    y: Float[Array, "batch seq heads dv"],
    log_normaliser: Float[Array, "batch seq heads"],
    q: Float[Array, "batch seq heads dim"],
    gate: GatePair | None,
    state: SympowState,
    p: int,
    scale: float,
) -> Float[Array, "batch seq heads dv"]:
    """y of a block of tokens alone, with log sum_j w_ij (not finite where a row has no weight),
    joined with a state's tokens before them: `attend`'s y, for outputs computed without the state
    (the Triton kernels)."""
    kv_heads = state.S.shape[1]
    y, log_normaliser, q = (grouped(a, kv_heads) for a in (y, log_normaliser, q))
    G, state_numerator, state_denominator, log_state_weight = query_state(q, gate, state, p, scale)
    log_local_weight = jnp.where(jnp.isfinite(log_normaliser), log_normaliser, -jnp.inf)
    stabiliser = finite_or_zero(jax.lax.stop_gradient(jnp.maximum(log_local_weight, log_state_weight)))
    local_factor, state_factor = jnp.exp(log_local_weight - stabiliser), jnp.exp(G - stabiliser)
    numerator = local_factor[..., None] * y + state_factor[..., None] * state_numerator
    return ungrouped(normalise(numerator, local_factor + state_factor * state_denominator))


def state_after(
    k: Float[Array, "batch seq kv_heads dim"],
    v: Float[Array, "batch seq kv_heads dv"],
    gate: GatePair | None,
    state: SympowState | None,
    p: int,
    scale: float,
    matmul: Callable = jnp.einsum,
) -> SympowState:
    """S_T = exp(G_T) S_0 + sum_j exp(G_T - G_j) phi(r k_j) v_j^T (z likewise, S_0 = 0 without a
    state). The decay is folded into the key before expansion: phi(exp(u/p) x) = exp(u) phi(x)."""
    root_scale = jnp.full(k.shape[:3], math.sqrt(scale), k.dtype)
    if gate is not None:
        end = tuple(part[:, -1:] for part in gate)
        root_scale = root_scale * jnp.exp(pair_difference(end, gate) / p)
    phi_k = symmetric_power_embedding(k * root_scale[..., None], p)
    added = SympowState(matmul("bjhD,bjhv->bhDv", phi_k, v), jnp.sum(phi_k, axis=1))
    if state is None:
        return added
    G_end = jnp.zeros((k.shape[0], k.shape[2]), k.dtype) if gate is None else gate[0][:, -1]
    return decay_and_add(state, G_end, added)


def attention_form(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq kv_heads dim"],
    v: Float[Array, "batch seq kv_heads dv"],
    log_g: Float[Array, "batch seq kv_heads"] | None,
    p: int,
    scale: float,
    initial_state: SympowState | None = None,
    return_state: bool = False,
) -> tuple[Float[Array, "batch seq heads dv"], SympowState | None]:
    """(y, the state after the last token if return_state, else None): `attend` over all the
    tokens, G counted from the first."""
    gate = None if log_g is None else exact_cumulative_gate(log_g)
    y = attend(q, k, v, gate, initial_state, p, scale)
    return y, state_after(k, v, gate, initial_state, p, scale) if return_state else None
