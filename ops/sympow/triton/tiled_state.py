"""The tiled phi_2 layout of the chunked kernels' states (docs/kernels.md), and what their
programs do with it: index, load and store state tiles, make a tile's features from rows of q
or k, take their gradients, and weigh keys and queries by the chunk-local gate L. On the host:
the tile tables, and the maps between this layout and the exact one of ops.sympow.state.

The head dim splits into wide blocks of WIDE = 16 dims and narrow blocks of NARROW = 4; for each
pair of wide blocks P <= B and each narrow block A inside P, one feature tile is
vec(x_A outer x_B) (TILE_FEATURES = 64 features), with multiplicity c = 1 when P = B and 2
otherwise, so that
    sum over tiles c vec(x_A x_B^T) . vec(y_A y_B^T) = sum_{P <= B} c (x_P . y_P)(x_B . y_B) = (x . y)^2.
That is D' = n(n + 1)/2 WIDE^2 features for n = dim / WIDE (2560 at dim 64, against the exact
2080): a little redundancy on the diagonal buys dense 64-row matmuls, and the features are made
in registers from rows of q or k, so phi(Q) and phi(K) never go to memory. Tiles are this narrow
so that the backward keys kernel holds them in registers without spilling (docs/decisions.md).
A state is [batch, chunks, heads, feature tiles, TILE_FEATURES, DIM_V] (the chunk's entering
state, or a gradient of one) and its norm [batch, chunks, heads, feature tiles, TILE_FEATURES],
both c-weighted: entry (a, b) of a tile holds c sum_j x_a x_b v_j.

Conventions as in ops.sympow.triton.tiles.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from ops.sympow.embedding import embedding_size, embedding_terms
from ops.sympow.triton.tiles import load_columns, load_gates, load_row

WIDE_BLOCK = 16  # dims of a wide block: the smallest width tl.dot takes

NARROW_BLOCK = 4  # dims of a narrow block: a quarter of one

# The same, as the kernels read them (a kernel reads only constexpr globals).
WIDE = tl.constexpr(WIDE_BLOCK)

NARROW = tl.constexpr(NARROW_BLOCK)

TILE_FEATURES = tl.constexpr(NARROW_BLOCK * WIDE_BLOCK)


# States are [batch, chunks, kv_heads, feature tiles, TILE_FEATURES, DIM_V] and norms [batch,
# chunks, kv_heads, feature tiles, TILE_FEATURES] (a state belongs to its key/value head); the
# tables narrow_blocks and wide_blocks give each feature tile's blocks (A, B), A in units of
# NARROW dims and B of WIDE.
@triton.jit
def state_tile_index(batch, head, chunk, feature_tile, seq_len, HEADS, CHUNK, FEATURE_TILES):
    """Index of (batch, chunk, head, feature tile) among the tiles of states of HEADS heads (the
    key/value heads), in int64 as batch is: times the TILE_FEATURES x DIM_V elements of a tile it
    can pass 2^31."""
    return ((batch * tl.cdiv(seq_len, CHUNK) + chunk) * HEADS + head) * FEATURE_TILES + feature_tile


@triton.jit
def state_offsets(tile_index, value_block, DIM_V, WIDTH):
    """Offsets of columns value_block * WIDTH .. (value_block + 1) * WIDTH of a state tile: [TILE_FEATURES, WIDTH]."""
    columns = value_block * WIDTH + tl.arange(0, WIDTH)
    return tile_index * TILE_FEATURES * DIM_V + tl.arange(0, TILE_FEATURES)[:, None] * DIM_V + columns[None, :]


@triton.jit
def load_norm(z_ptr, tile_index):
    return tl.load(z_ptr + tile_index * TILE_FEATURES + tl.arange(0, TILE_FEATURES))  # [TILE_FEATURES]


@triton.jit
def load_state(s_ptr, z_ptr, tile_index, DIM_V):
    """A whole state tile [TILE_FEATURES, DIM_V] and its norm [TILE_FEATURES]."""
    state = tl.load(s_ptr + state_offsets(tile_index, value_block=0, DIM_V=DIM_V, WIDTH=DIM_V))
    return state, load_norm(z_ptr, tile_index)


@triton.jit
def store_state_columns(s_ptr, z_ptr, tile_index, value_block, state, norm, DIM_V, VALUE_BLOCK):
    """One column block of a state tile; its norm is stored by the first column block only."""
    tl.store(s_ptr + state_offsets(tile_index, value_block, DIM_V, WIDTH=VALUE_BLOCK), state)
    features = tl.arange(0, TILE_FEATURES)
    tl.store(
        z_ptr + tile_index * TILE_FEATURES + features,
        norm,
        mask=features < tl.where(value_block == 0, TILE_FEATURES, 0),
    )


@triton.jit
def tile_blocks(narrow_blocks_ptr, wide_blocks_ptr, feature_tile):
    """The blocks (A, B) of a feature tile and its multiplicity c: 1 when A lies in B, else 2."""
    narrow, wide = tl.load(narrow_blocks_ptr + feature_tile), tl.load(wide_blocks_ptr + feature_tile)
    return narrow, wide, tl.where(narrow // (WIDE // NARROW) == wide, 1.0, 2.0)


@triton.jit
def scan_program(narrow_blocks_ptr, wide_blocks_ptr, VALUE_BLOCKS):
    """The feature tile, its blocks and multiplicity, and the value column block of a scan
    program: program axis 0 runs over feature tiles x value column blocks."""
    feature_tile, value_block = tl.program_id(0) // VALUE_BLOCKS, tl.program_id(0) % VALUE_BLOCKS
    narrow, wide, multiplicity = tile_blocks(narrow_blocks_ptr, wide_blocks_ptr, feature_tile)
    return feature_tile, narrow, wide, multiplicity, value_block


@triton.jit
def tile_features(x_narrow, x_wide, ROWS):
    """vec(x_A outer x_B) for each row: [ROWS, TILE_FEATURES] from x_A [ROWS, NARROW] and x_B [ROWS, WIDE]."""
    return tl.reshape(x_narrow[:, :, None] * x_wide[:, None, :], (ROWS, TILE_FEATURES))


@triton.jit
def tile_feature_gradients(d_features, x_narrow, x_wide, ROWS):
    """The gradient of sum(d_features * vec(x_A outer x_B)) in x_A [ROWS, NARROW] and in x_B [ROWS, WIDE]."""
    d_outer = tl.reshape(d_features, (ROWS, NARROW, WIDE))  # [ROWS, NARROW, WIDE]
    return tl.sum(d_outer * x_wide[:, None, :], axis=2), tl.sum(d_outer * x_narrow[:, :, None], axis=1)


@triton.jit
def placed_in_block(d_block, block, ROWS, BLOCKS, WIDTH):
    """d_block [ROWS, WIDTH] at block `block` of the head dim split in BLOCKS blocks: [ROWS, BLOCKS, WIDTH],
    zeros elsewhere."""
    return tl.where(tl.arange(0, BLOCKS)[None, :, None] == block, d_block[:, None, :], 0.0)


@triton.jit
def add_tile_gradient(d_narrow_blocks, d_wide_blocks, d_features, x_narrow, x_wide, narrow, wide, ROWS, DIM):
    """Add the gradient of sum(d_features * vec(x_A outer x_B)) to the head dim's gradient, held
    split in narrow blocks [ROWS, DIM / NARROW, NARROW] and in wide blocks [ROWS, DIM / WIDE, WIDE]."""
    d_narrow, d_wide = tile_feature_gradients(d_features, x_narrow, x_wide, ROWS)
    d_narrow_blocks += placed_in_block(d_block=d_narrow, block=narrow, ROWS=ROWS, BLOCKS=DIM // NARROW, WIDTH=NARROW)
    d_wide_blocks += placed_in_block(d_block=d_wide, block=wide, ROWS=ROWS, BLOCKS=DIM // WIDE, WIDTH=WIDE)
    return d_narrow_blocks, d_wide_blocks


@triton.jit
def joined_gradient(d_narrow_blocks, d_wide_blocks, ROWS, DIM):
    """The head dim's gradient [ROWS, DIM] from its two block splits."""
    return tl.reshape(d_narrow_blocks, (ROWS, DIM)) + tl.reshape(d_wide_blocks, (ROWS, DIM))


@triton.jit
def as_input(x, x_ptr):
    """x in the dtype of the inputs x_ptr points to, as a state matmul's operand (accumulated in float32)."""
    return x.to(x_ptr.dtype.element_ty)


@triton.jit
def scaled_blocks(x_ptr, positions, narrow, wide, scale, seq_len, HEADS, DIM):
    """Blocks A [rows, NARROW] and B [rows, WIDE] of rows of q or k, each row times its scale, in float32."""
    x_narrow = load_columns(x_ptr, positions, block=narrow, seq_len=seq_len, HEADS=HEADS, DIM=DIM, WIDTH=NARROW)
    x_wide = load_columns(x_ptr, positions, block=wide, seq_len=seq_len, HEADS=HEADS, DIM=DIM, WIDTH=WIDE)
    return x_narrow.to(tl.float32) * scale, x_wide.to(tl.float32) * scale


@triton.jit
def chunk_end_gate(l_ptr, chunk, seq_len, HEADS, CHUNK):
    """E_m: L (or its lo part) at the last position of chunk m (the last real one, for a partial chunk)."""
    return tl.load(l_ptr + (tl.minimum((chunk + 1) * CHUNK, seq_len) - 1) * HEADS)


@triton.jit
def key_root_decay(l_ptr, l_lo_ptr, cols, chunk, seq_len, HEADS, CHUNK, ROOT_SCALE):
    """r exp((E_m - L_j) / 2) [cols], which makes phi of the scaled key carry the decay
    exp(E_m - L_j); E_m - L_j from hi and lo apart, as the intra-chunk weights take L_i - L_j."""
    end_hi = chunk_end_gate(l_ptr, chunk, seq_len, HEADS, CHUNK)
    end_lo = chunk_end_gate(l_lo_ptr, chunk, seq_len, HEADS, CHUNK)
    hi, lo = load_gates(g_ptr=l_ptr, g_lo_ptr=l_lo_ptr, positions=cols, seq_len=seq_len, HEADS=HEADS)
    return tl.exp(((end_hi - hi) + (end_lo - lo)) * 0.5) * ROOT_SCALE


@triton.jit
def state_shares(l_ptr, log_normaliser_ptr, rows, seq_len, HEADS, KV_HEADS):
    """exp(L_i - log normaliser_i) [rows]: how a unit of state numerator or norm weighs in y_i (0 for a row
    with no weight). The log-normaliser is the query head's (HEADS), L its key/value head's."""
    L = load_row(l_ptr, rows, seq_len, KV_HEADS)
    log_normaliser = load_row(log_normaliser_ptr, rows, seq_len, HEADS)
    return tl.exp(L - log_normaliser)


@functools.cache
def tile_tables(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (A, B) of every feature tile, in the order of the state's feature tile axis: for
    each pair of wide blocks P <= B, the narrow blocks A inside P (A in units of NARROW dims)."""
    narrow_per_wide, wide_blocks = WIDE_BLOCK // NARROW_BLOCK, dim // WIDE_BLOCK
    tiles = [
        (p * narrow_per_wide + part, b)
        for p in range(wide_blocks)
        for b in range(p, wide_blocks)
        for part in range(narrow_per_wide)
    ]
    return np.array([a for a, _ in tiles], np.int32), np.array([b for _, b in tiles], np.int32)


@functools.cache
def tiled_rows(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each tiled feature (a, b), in the state's order: the exact layout's row of the pair
    {a, b}, the factor c / w that turns that row into the feature (w = sqrt(2) off the
    diagonal, the exact layout's weight; c the tile's multiplicity), and how many tiled features
    share the row (2 for a != b inside one wide block, else 1)."""
    index = {tuple(pair): row for row, pair in enumerate(embedding_terms(dim, 2)[0])}
    narrow, wide = tile_tables(dim)
    a = (narrow[:, None, None] * NARROW_BLOCK + np.arange(NARROW_BLOCK)[:, None]).repeat(WIDE_BLOCK, 2)
    b = (wide[:, None, None] * WIDE_BLOCK + np.arange(WIDE_BLOCK)[None, :]).repeat(NARROW_BLOCK, 1)
    a, b = a.ravel(), b.ravel()
    rows = np.array([index[min(x, y), max(x, y)] for x, y in zip(a, b)], np.int32)
    multiplicity = np.where(a // WIDE_BLOCK == b // WIDE_BLOCK, 1.0, 2.0)
    factors = multiplicity / np.where(a == b, 1.0, math.sqrt(2))
    return rows, factors, np.bincount(rows)[rows]


def tiled_from_exact(S, z):
    """A state in the exact layout, S [..., D, dim_v] and z [..., D], in the tiled one:
    [..., feature tiles, TILE_FEATURES, dim_v] and [..., feature tiles, TILE_FEATURES]."""
    dim = round((math.isqrt(8 * S.shape[-2] + 1) - 1) / 2)
    rows, factors, _ = tiled_rows(dim)
    factors = jnp.asarray(factors, S.dtype)
    tiles = (len(rows) // TILE_FEATURES.value, TILE_FEATURES.value)
    return (
        (S[..., rows, :] * factors[:, None]).reshape(*S.shape[:-2], *tiles, S.shape[-1]),
        (z[..., rows] * factors).reshape(*z.shape[:-1], *tiles),
    )


def exact_from_tiled(S, z, dim: int):
    """The inverse of tiled_from_exact on its image (a state the tiled features sum to, in which
    entries (a, b) and (b, a) of one wide block agree): each exact row the mean of its tiled features."""
    rows, factors, shared = tiled_rows(dim)
    weights = jnp.asarray(1 / (factors * shared), S.dtype)

    def rows_summed(x, axis):  # the tiled features (axis) summed into their exact rows
        summed = jax.ops.segment_sum(jnp.moveaxis(x, axis, 0), rows, num_segments=embedding_size(dim, 2))
        return jnp.moveaxis(summed, 0, axis)

    S = S.reshape(*S.shape[:-3], -1, S.shape[-1]) * weights[:, None]
    return rows_summed(S, -2), rows_summed(z.reshape(*z.shape[:-2], -1) * weights, -1)
