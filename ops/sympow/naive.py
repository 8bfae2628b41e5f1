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

Every form divides by `max(den, EPS)` where `den` has been divided by a stabiliser that makes
it >= 1 whenever the row carries any weight at all (the row max in log space, as flash
attention does). So EPS never changes a well-defined output, which is why all forms agree to
float64 round-off, and a row with no weight (q orthogonal to every key) gives 0, not NaN.
"""

import functools
import itertools
import math

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


def attention_form(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"],
    v: Float[Array, "batch seq heads dv"],
    log_g: Float[Array, "batch seq heads"] | None,
    p: int,
    scale: float,
) -> Float[Array, "batch seq heads dv"]:
    """y_i = sum_{j<=i} w_ij v_j / sum_{j<=i} w_ij, w_ij = (s q_i . k_j)^p exp(G_i - G_j), in log space."""
    log_w = log_weights(q, k, None if log_g is None else cumulative_gate(log_g), p, scale)
    row_max = finite_or_zero(jax.lax.stop_gradient(jnp.max(log_w, axis=-1, keepdims=True)))
    w = jnp.exp(log_w - row_max)
    numerator = jnp.einsum("bhij,bjhd->bihd", w, v)
    denominator = jnp.moveaxis(jnp.sum(w, axis=-1), 1, -1)  # [batch, seq, heads]
    return normalise(numerator, denominator)


def recurrent_form(
    q: Float[Array, "batch seq heads dim"],
    k: Float[Array, "batch seq heads dim"],
    v: Float[Array, "batch seq heads dv"],
    log_g: Float[Array, "batch seq heads"] | None,
    p: int,
    scale: float,
) -> Float[Array, "batch seq heads dv"]:
    """S_t = gamma_t S_{t-1} + phi(r k_t) v_t^T; z likewise with 1; y_t = phi(r q_t)^T S_t / phi(r q_t)^T z_t."""
    batch, _, heads, dim = q.shape
    root_scale = math.sqrt(scale)
    state_size = embedding_size(dim, p)
    if log_g is None:
        log_g = jnp.zeros(q.shape[:3], q.dtype)

    def step(carry, token):
        S, z = carry
        q_t, k_t, v_t, log_g_t = token
        gamma = jnp.exp(log_g_t)[..., None]
        phi_k = symmetric_power_embedding(k_t * root_scale, p)
        S = gamma[..., None] * S + phi_k[..., :, None] * v_t[..., None, :]
        z = gamma * z + phi_k
        phi_q = symmetric_power_embedding(q_t * root_scale, p)
        numerator = jnp.einsum("bhD,bhDv->bhv", phi_q, S)
        denominator = jnp.einsum("bhD,bhD->bh", phi_q, z)
        # The stabiliser is the denominator itself; a row with no weight stays 0.
        stabiliser = jnp.where(denominator > 0, denominator, jnp.ones_like(denominator))
        return (S, z), normalise(numerator / stabiliser[..., None], denominator / stabiliser)

    S0 = jnp.zeros((batch, heads, state_size, v.shape[-1]), v.dtype)
    z0 = jnp.zeros((batch, heads, state_size), v.dtype)
    tokens = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, log_g))
    _, y = jax.lax.scan(step, (S0, z0), tokens)
    return jnp.moveaxis(y, 0, 1)
