"""Key/value heads shared by groups of query heads (grouped-query attention): with `heads` query
heads over `kv_heads` key/value heads, query head h reads key/value head h // (heads // kv_heads),
the convention of the authors' kernels and flash-linear-attention. Keys, values, the gate and the
state belong to the key/value head; the forms compute with the queries grouped, [..., kv_heads,
group, ...], so that each key/value head's keys, values, gate and state serve its whole group
without being copied. Equal heads are groups of one: the reshapes below cost nothing."""

import jax.numpy as jnp
from jaxtyping import Array


def grouped(x: Array, kv_heads: int, axis: int = 2) -> Array:
    """[..., heads, ...] -> [..., kv_heads, heads // kv_heads, ...] at axis: query head h is
    (h // group, h % group)."""
    return x.reshape(*x.shape[:axis], kv_heads, x.shape[axis] // kv_heads, *x.shape[axis + 1 :])


def group_sum(x: Array, kv_heads: int) -> Array:
    """x [batch, seq, heads, ...] summed over each key/value head's group of query heads (axis 2),
    in float32 (exact for equal heads, groups of one): the kernels' per query head shares of a
    key/value head's gradient made one."""
    return grouped(x, kv_heads).sum(3, dtype=jnp.float32).astype(x.dtype)


def ungrouped(x: Array, axis: int = 2) -> Array:
    """[..., kv_heads, group, ...] -> [..., kv_heads * group, ...] at axis: `grouped` undone."""
    return x.reshape(*x.shape[:axis], x.shape[axis] * x.shape[axis + 1], *x.shape[axis + 2 :])
