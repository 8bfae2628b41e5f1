"""phi_p, the symmetric power embedding, as the forms compute it.

One feature per non-decreasing multi-index a_1 <= ... <= a_p of {0..dim-1}, in the order
itertools.combinations_with_replacement gives them (the state's layout, docs/maths.md), with
phi_p(x) . phi_p(y) = (x . y)^p.
"""

import functools
import itertools
import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


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
