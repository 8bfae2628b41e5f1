"""The maths of symmetric power attention, written as plainly as it reads on paper.

Shapes: q, k [batch, seq, heads, dim]; v [batch, seq, heads, dim_v];
log_g [batch, seq, heads] with log_g = log gamma <= 0. Scale s multiplies q and k.

Two reference forms live here:
- `attention_form`: w_ij = (s q_i . k_j)^p exp(G_i - G_j) for j <= i, with G the cumulative
  gate, y_i = sum_j w_ij v_j / sum_j w_ij. O(T^2).
- `recurrent_form`: S_t = gamma_t S_{t-1} + phi(r k_t) v_t^T, z_t = gamma_t z_{t-1} + phi(r k_t),
  y_t = phi(r q_t)^T S_t / phi(r q_t)^T z_t with r = sqrt(s), so that
  phi(r q) . phi(r k) = (s q . k)^p: the same weights as the attention form, not off by s^p,
  which matters once a form mixes the two (the chunked one does). O(T D d), state D x d per head.

Both take a state (S, z) left by earlier tokens: those tokens count as coming before q, so
they weigh exp(G_i) phi(r q_i)^T S in y_i's numerator (and with z in its denominator), and both
can return the state after their last token, S_T = exp(G_T) S_0 + sum_j exp(G_T - G_j) phi(r k_j) v_j^T.

Every form divides by `max(den, EPS)` where `den` has been divided by a stabiliser that makes
it >= 1 whenever the row carries any weight at all (the row max in log space, as flash
attention does). So EPS never changes a well-defined output, which is why all forms agree to
float64 round-off, and a row with no weight (q orthogonal to every key) gives 0, not NaN.
"""

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ops.exact import exact_cumsum, pair_difference

EPS = 1e-6


@functools.cache
def embedding_terms(dim: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """The non-decreasing multi-indices a_1 <= ... <= a_p of {0..dim-1} and their weights.

    The weight of a multi-index is sqrt(p! / prod_i c_i!), c_i counting how often i occurs,
    so that phi(x) . phi(y) = sum over all p-tuples of prod x_a prod y_a = (x . y)^p.
    """
    indices = np.array(list(itertools.combinations_with_replacement(range(dim), p)), np.int32).reshape(-1, p)
    # In a sorted multi-index, prod_i c_i! is the product of each entry's position in its run
    # of equal entries (a run of length c contributes 1 * 2 * ... * c).
    run_position = np.ones(indices.shape, np.float64)
    for j in range(1, p):
        run_position[:, j] = np.where(indices[:, j] == indices[:, j - 1], run_position[:, j - 1] + 1, 1)
    weights = np.sqrt(math.factorial(p) / np.prod(run_position, axis=1))
    return indices, weights


def embedding_size(dim: int, p: int) -> int:
    """D = C(dim + p - 1, p): the number of non-decreasing multi-indices."""
    return math.comb(dim + p - 1, p)


def symmetric_power_embedding(x: Float[Array, "*b dim"], p: int) -> Float[Array, "*b D"]:
    """phi_p(x): one feature per non-decreasing multi-index, with phi(x) . phi(y) = (x . y)^p."""
    indices, weights = embedding_terms(x.shape[-1], p)
    features = jnp.prod(x[..., indices], axis=-1)
    return features * jnp.asarray(weights, x.dtype)


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


GatePair = tuple[Float[Array, "batch seq heads"], Float[Array, "batch seq heads"]]


def cumulative_gate(log_g: Float[Array, "batch seq heads"]) -> GatePair:
    """G_i = sum_{u <= i} g_u, as an exact pair hi + lo (ops.exact). With strong gates |G| grows
    as T |log gamma|, and G_i - G_j of one rounded float32 G would lose the digits that near
    neighbours' weights need: in float32 at T = 2048 that gave y 8e-5 relative error and its
    gradients 6e-4 at gamma = 0.01 (now ~1e-6; tests/test_forms.py)."""
    return exact_cumsum(log_g, axis=1)


class SympowState(NamedTuple):
    """The recurrent state after some tokens, per batch entry and head, in the exact layout (one
    row per non-decreasing multi-index, in `embedding_terms`' order, D = C(dim + p - 1, p)):
    S = sum_j exp(G_T - G_j) phi(r k_j) v_j^T and z = sum_j exp(G_T - G_j) phi(r k_j).
    Raw sums, not divided by any stabiliser: they stay finite, since every decay is <= 1."""

    S: Float[Array, "batch heads D dv"]
    z: Float[Array, "batch heads D"]


def empty_state(batch: int, heads: int, dim: int, dim_v: int, p: int, dtype=jnp.float32) -> SympowState:
    """The state before any token."""
    D = embedding_size(dim, p)
    return SympowState(jnp.zeros((batch, heads, D, dim_v), dtype), jnp.zeros((batch, heads, D), dtype))


def state_matmul(subscripts: str, features: Array, other: Array) -> Array:
    """A product with phi features that builds or queries a state: the matmuls the Triton kernels
    run with operands in the inputs' dtype (benchmarks/bf16_state_operands.py rounds them here)."""
    return jnp.einsum(subscripts, features, other)


def log_weights(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"],
    cumulative_gate: GatePair | None,
    p: int,
    scale: float,
) -> Float[Array, "batch heads seq seq"]:
    """log w_ij = p log|s q_i . k_j| + G_i - G_j for j <= i, -inf for j > i."""
    seq = q.shape[1]
    log_w = p * log_abs(jnp.einsum("bihd,bjhd->bhij", q * scale, k))
    if cumulative_gate is not None:
        gate = tuple(jnp.moveaxis(part, 1, -1) for part in cumulative_gate)  # [batch, heads, seq]
        log_w = log_w + pair_difference(tuple(part[..., :, None] for part in gate), tuple(part[..., None, :] for part in gate))
    return jnp.where(jnp.tril(jnp.ones((seq, seq), dtype=bool)), log_w, -jnp.inf)


def attend(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"],
    v: Float[Array, "batch seq heads dv"],
    cumulative_gate: GatePair | None,
    state: SympowState | None,
    p: int,
    scale: float,
) -> Float[Array, "batch seq heads dv"]:
    """y_i = (sum_{j<=i} w_ij v_j + exp(G_i) phi(r q_i)^T S) / (sum_{j<=i} w_ij + exp(G_i) phi(r q_i)^T z),
    w_ij = (s q_i . k_j)^p exp(G_i - G_j), in log space: both parts are put in one frame, the
    larger of the row max of log w and log exp(G_i) phi(r q_i)^T z, so the denominator is >= 1
    there. G counts from the first of these tokens (a chunk's start, in the chunked form)."""
    log_w = log_weights(q, k, cumulative_gate, p, scale)
    stabiliser = jnp.max(log_w, axis=-1)  # [batch, heads, seq]
    if state is not None:
        G, state_numerator, state_denominator, log_state_weight = query_state(q, cumulative_gate, state, p, scale)
        stabiliser = jnp.maximum(stabiliser, jnp.moveaxis(log_state_weight, -1, 1))
    stabiliser = finite_or_zero(jax.lax.stop_gradient(stabiliser))
    w = jnp.exp(log_w - stabiliser[..., None])
    numerator = jnp.einsum("bhij,bjhv->bihv", w, v)
    denominator = jnp.moveaxis(jnp.sum(w, axis=-1), 1, -1)  # [batch, seq, heads]
    if state is not None:
        state_factor = jnp.exp(G - jnp.moveaxis(stabiliser, 1, -1))  # [batch, seq, heads]
        numerator = numerator + state_factor[..., None] * state_numerator
        denominator = denominator + state_factor * state_denominator
    return normalise(numerator, denominator)


def query_state(q: Float[Array, "batch seq heads dim"], cumulative_gate: GatePair | None, state: SympowState, p: int, scale: float):
    """phi(r q_i)^T S and phi(r q_i)^T z, and log exp(G_i) phi(r q_i)^T z, the state's log weight
    in y_i (-inf where it has none); with G_i, which a decay from the first token takes as hi
    alone (hi + lo rounds to it)."""
    G = jnp.zeros(q.shape[:3], q.dtype) if cumulative_gate is None else cumulative_gate[0]
    phi_q = symmetric_power_embedding(q * math.sqrt(scale), p)
    numerator = state_matmul("bihD,bhDv->bihv", phi_q, state.S)
    denominator = jnp.einsum("bihD,bhD->bih", phi_q, state.z)
    return G, numerator, denominator, G + log_abs(jnp.maximum(denominator, 0))


def add_state(
    y: Float[Array, "batch seq heads dv"],
    log_normaliser: Float[Array, "batch seq heads"],
    q: Float[Array, "batch seq heads dim"],
    cumulative_gate: GatePair | None,
    state: SympowState,
    p: int,
    scale: float,
) -> Float[Array, "batch seq heads dv"]:
    """y of a block of tokens alone, with log sum_j w_ij (not finite where a row has no weight),
    joined with a state's tokens before them: `attend`'s y, for outputs computed without the state
    (the Triton kernels)."""
    G, state_numerator, state_denominator, log_state_weight = query_state(q, cumulative_gate, state, p, scale)
    log_local_weight = jnp.where(jnp.isfinite(log_normaliser), log_normaliser, -jnp.inf)
    stabiliser = finite_or_zero(jax.lax.stop_gradient(jnp.maximum(log_local_weight, log_state_weight)))
    local_factor, state_factor = jnp.exp(log_local_weight - stabiliser), jnp.exp(G - stabiliser)
    numerator = local_factor[..., None] * y + state_factor[..., None] * state_numerator
    return normalise(numerator, local_factor + state_factor * state_denominator)


def state_after(
    k: Float[Array, "batch seq heads dim"],
    v: Float[Array, "batch seq heads dv"],
    cumulative_gate: GatePair | None,
    state: SympowState | None,
    p: int,
    scale: float,
) -> SympowState:
    """S_T = exp(G_T) S_0 + sum_j exp(G_T - G_j) phi(r k_j) v_j^T (z likewise, S_0 = 0 without a
    state). The decay is folded into the key before expansion: phi(exp(u/p) x) = exp(u) phi(x)."""
    root_scale = jnp.full(k.shape[:3], math.sqrt(scale), k.dtype)
    if cumulative_gate is not None:
        end = tuple(part[:, -1:] for part in cumulative_gate)
        root_scale = root_scale * jnp.exp(pair_difference(end, cumulative_gate) / p)
    phi_k = symmetric_power_embedding(k * root_scale[..., None], p)
    added = SympowState(state_matmul("bjhD,bjhv->bhDv", phi_k, v), jnp.sum(phi_k, axis=1))
    if state is None:
        return added
    G_end = jnp.zeros((k.shape[0], k.shape[2]), k.dtype) if cumulative_gate is None else cumulative_gate[0][:, -1]
    return decay_and_add(state, G_end, added)


def decay_and_add(state: SympowState, log_decay: Float[Array, "batch heads"], added: SympowState) -> SympowState:
    """exp(log_decay) S + added S (z likewise): the state carried over a stretch of tokens."""
    decay = jnp.exp(log_decay)
    return SympowState(decay[..., None, None] * state.S + added.S, decay[..., None] * state.z + added.z)


def attention_form(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"],
    v: Float[Array, "batch seq heads dv"],
    log_g: Float[Array, "batch seq heads"] | None,
    p: int,
    scale: float,
    initial_state: SympowState | None = None,
) -> Float[Array, "batch seq heads dv"]:
    """y_i = sum_{j<=i} w_ij v_j / sum_{j<=i} w_ij, w_ij = (s q_i . k_j)^p exp(G_i - G_j), in log
    space; with a state, its tokens come before q (see `attend`)."""
    return attend(q, k, v, None if log_g is None else cumulative_gate(log_g), initial_state, p, scale)


def recurrent_step(
    q: Float[Array, "batch heads dim"],
    k: Float[Array, "batch heads dim"],
    v: Float[Array, "batch heads dv"],
    log_g: Float[Array, "batch heads"],
    state: SympowState,
    p: int,
    scale: float,
) -> tuple[Float[Array, "batch heads dv"], SympowState]:
    """One token: S = gamma S + phi(r k) v^T, z = gamma z + phi(r k), y = phi(r q)^T S / phi(r q)^T z."""
    root_scale = math.sqrt(scale)
    phi_k = symmetric_power_embedding(k * root_scale, p)
    state = decay_and_add(state, log_g, SympowState(phi_k[..., :, None] * v[..., None, :], phi_k))
    phi_q = symmetric_power_embedding(q * root_scale, p)
    numerator = jnp.einsum("bhD,bhDv->bhv", phi_q, state.S)
    denominator = jnp.einsum("bhD,bhD->bh", phi_q, state.z)
    # The stabiliser is the denominator itself; a row with no weight stays 0.
    stabiliser = jnp.where(denominator > 0, denominator, jnp.ones_like(denominator))
    return normalise(numerator / stabiliser[..., None], denominator / stabiliser), state


def recurrent_form(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"],
    v: Float[Array, "batch seq heads dv"],
    log_g: Float[Array, "batch seq heads"] | None,
    p: int,
    scale: float,
    initial_state: SympowState | None = None,
) -> tuple[Float[Array, "batch seq heads dv"], SympowState]:
    """`recurrent_step` over the tokens, from the given state (or zero); returns y and the last state."""
    batch, _, heads, dim = q.shape
    if log_g is None:
        log_g = jnp.zeros(q.shape[:3], q.dtype)
    if initial_state is None:
        initial_state = empty_state(batch, heads, dim, v.shape[-1], p, v.dtype)

    def step(state, token):
        y, state = recurrent_step(*token, state, p, scale)
        return state, y

    tokens = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, log_g))
    state, y = jax.lax.scan(step, initial_state, tokens)
    return jnp.moveaxis(y, 0, 1), state
