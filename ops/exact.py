"""Error-free float32 arithmetic: a value carried as an unevaluated pair hi + lo of float32
holds about twice float32's digits (a pair of float64, twice float64's). Used where a long
running sum must stay exact: rotary angles (sympow.rotary) and the cumulative gate G that every
form differences (G_i - G_j)."""

import functools

import jax
import jax.numpy as jnp
from jax import Array


def two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """s + e = a + b exactly, s = fl(a + b) (Knuth)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def split(a: Array) -> tuple[Array, Array]:
    """a = hi + lo exactly, each with half the significand (Veltkamp: 12 bits in float32, 26 in float64)."""
    c = a * float(2 ** ((jnp.finfo(a.dtype).nmant + 2) // 2) + 1)
    hi = c - (c - a)
    return hi, a - hi


def two_product(a: Array, b: Array) -> tuple[Array, Array]:
    """p + e = a * b exactly, p = fl(a * b) (Dekker)."""
    product = a * b
    a_hi, a_lo = split(a)
    b_hi, b_lo = split(b)
    error = ((a_hi * b_hi - product) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    return product, error


def add_pairs(x: tuple[Array, Array], y: tuple[Array, Array]) -> tuple[Array, Array]:
    """(hi, lo) + (hi, lo) in double-float32 arithmetic."""
    s, e = two_sum(x[0], y[0])
    return two_sum(s, e + x[1] + y[1])


def pair_difference(later: tuple[Array, Array], earlier: tuple[Array, Array]) -> Array:
    """later - earlier for two (hi, lo) pairs, the parts differenced apart: when the two are
    close, hi - hi is exact and the lo parts keep the digits that one rounded sum would lose."""
    return (later[0] - earlier[0]) + (later[1] - earlier[1])


# Jitted: called eagerly (a reference form outside jit), the scan's hundreds of small ops would
# each be dispatched apart.
@functools.partial(jax.jit, static_argnames="axis")
def exact_cumsum(x: Array, axis: int) -> tuple[Array, Array]:
    """The running sum of x along axis as hi + lo, by an associative scan with error-free additions."""
    return jax.lax.associative_scan(add_pairs, (x, jnp.zeros_like(x)), axis=axis)
