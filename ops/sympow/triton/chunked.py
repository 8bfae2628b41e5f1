"""The chunked path for p = 2 in Triton: the state scan, the state query fused with the
intra-chunk attention and the normalisation, and their backward kernels.

The state uses a tiled layout of phi_2 (docs/kernels.md). The head dim splits into wide blocks
of WIDE = 16 dims and narrow blocks of NARROW = 4; for each pair of wide blocks P <= B and each
narrow block A inside P, one feature tile is vec(x_A outer x_B) (TILE_FEATURES = 64 features),
with multiplicity c = 1 when P = B and 2 otherwise, so that
    sum over tiles c vec(x_A x_B^T) . vec(y_A y_B^T) = sum_{P <= B} c (x_P . y_P)(x_B . y_B) = (x . y)^2.
That is D' = n(n + 1)/2 WIDE^2 features for n = dim / WIDE (2560 at dim 64, against the exact
2080): a little redundancy on the diagonal buys dense 64-row matmuls, and the features are made
in registers from rows of q or k, so phi(Q) and phi(K) never go to memory. Tiles are this narrow
so that the backward keys kernel holds them in registers without spilling (docs/decisions.md).

Per batch x head, with L the chunk-local cumulative gate and E_m the last L of chunk m
(as in ops.sympow.chunk):
    S_0 = 0,  S_{m+1} = exp(E_m) S_m + sum_{j in m} c phi(exp((E_m - L_j)/2) r k_j) v_j^T   (z likewise, with 1)
    y_i = [exp(L_i) phi(r q_i)^T S_m + sum_{j in m, j <= i} w_ij v_j] / [the same with z and 1]
with r = sqrt(scale) and w_ij the gated power weights inside the chunk, evaluated in log
space by the flash-attention helpers. The running states and the stored S and z are float32;
the state matmuls take their operands (phi, S, v, dy and the stored state gradient dS) in the
inputs' dtype and accumulate in float32, as flash attention does with its weights: bf16 inputs
take bf16 tensor-core matmuls, at twice TF32's rate (within the bf16 rule when emulated on a
CPU: docs/decisions.md).

Kernels, and their programs (axis 0, batch x head):
    power_state_scan              (feature tile x value column block): S_m for every chunk, one chunk after another.
    power_chunk_forward           (query block): y and the log-normaliser.
    power_chunk_backward_queries  (query block): dq and the row part of dL.
    power_state_scan_backward     (feature tile x value column block): the gradient of each chunk's state
                                  contribution, and of its end gate through the decay.
    power_chunk_backward_keys     (key block): dk, dv and the column part of dL.
Conventions as in ops.sympow.triton.attention; a state tile is [TILE_FEATURES, DIM_V] (or
[TILE_FEATURES, VALUE_BLOCK] columns of it) and its norm [TILE_FEATURES].
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from ops.sympow.chunk import split_chunks
from ops.sympow.gate import chunk_local_gates, reverse_cumsum
from ops.sympow.triton.attention import check_dims, log_weight_delta
from ops.sympow.triton.launch import LaunchOptions, Plan, Tiling
from ops.sympow.triton.tiles import (
    accumulate_key_gradients,
    accumulate_keys,
    accumulate_query_gradients,
    head_bases,
    load_columns,
    load_gates,
    load_keys,
    load_query_gradients,
    load_row,
    load_tile,
    store_outputs,
    store_row,
    store_tile,
)

WIDE_BLOCK = 16  # dims of a wide block: the smallest width tl.dot takes
NARROW_BLOCK = 4  # dims of a narrow block: a quarter of one
# The same, as the kernels read them (a kernel reads only constexpr globals).
WIDE = tl.constexpr(WIDE_BLOCK)
NARROW = tl.constexpr(NARROW_BLOCK)
TILE_FEATURES = tl.constexpr(NARROW_BLOCK * WIDE_BLOCK)


# States are [batch, chunks, heads, feature tiles, TILE_FEATURES, DIM_V] and norms [batch, chunks,
# heads, feature tiles, TILE_FEATURES]; the tables narrow_blocks and wide_blocks give each feature
# tile's blocks (A, B), A in units of NARROW dims and B of WIDE.
@triton.jit
def state_tile_index(chunk, feature_tile, seq_len, HEADS, CHUNK, FEATURE_TILES):
    """Index of this program's (batch, chunk, head, feature tile) among the states' tiles, in
    int64: times the TILE_FEATURES x DIM_V elements of a tile it can pass 2^31."""
    batch_head = tl.program_id(1).to(tl.int64)
    batch, head = batch_head // HEADS, batch_head % HEADS
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
    state = tl.load(s_ptr + state_offsets(tile_index=tile_index, value_block=0, DIM_V=DIM_V, WIDTH=DIM_V))
    return state, load_norm(z_ptr=z_ptr, tile_index=tile_index)


@triton.jit
def store_state_columns(s_ptr, z_ptr, tile_index, value_block, state, norm, DIM_V, VALUE_BLOCK):
    """One column block of a state tile; its norm is stored by the first column block only."""
    tl.store(
        s_ptr + state_offsets(tile_index=tile_index, value_block=value_block, DIM_V=DIM_V, WIDTH=VALUE_BLOCK), state
    )
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
    narrow, wide, multiplicity = tile_blocks(
        narrow_blocks_ptr=narrow_blocks_ptr, wide_blocks_ptr=wide_blocks_ptr, feature_tile=feature_tile
    )
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
    d_narrow, d_wide = tile_feature_gradients(d_features=d_features, x_narrow=x_narrow, x_wide=x_wide, ROWS=ROWS)
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
def chunk_end_gate(l_ptr, chunk, seq_len, HEADS, CHUNK):
    """E_m: L (or its lo part) at the last position of chunk m (the last real one, for a partial chunk)."""
    return tl.load(l_ptr + (tl.minimum((chunk + 1) * CHUNK, seq_len) - 1) * HEADS)


@triton.jit
def key_root_decay(l_ptr, l_lo_ptr, cols, chunk, seq_len, HEADS, CHUNK, ROOT_SCALE):
    """r exp((E_m - L_j) / 2) [cols], which makes phi of the scaled key carry the decay
    exp(E_m - L_j); E_m - L_j from hi and lo apart, as the intra-chunk weights take L_i - L_j."""
    end_hi = chunk_end_gate(l_ptr=l_ptr, chunk=chunk, seq_len=seq_len, HEADS=HEADS, CHUNK=CHUNK)
    end_lo = chunk_end_gate(l_ptr=l_lo_ptr, chunk=chunk, seq_len=seq_len, HEADS=HEADS, CHUNK=CHUNK)
    hi, lo = load_gates(g_ptr=l_ptr, g_lo_ptr=l_lo_ptr, positions=cols, seq_len=seq_len, HEADS=HEADS)
    return tl.exp(((end_hi - hi) + (end_lo - lo)) * 0.5) * ROOT_SCALE


@triton.jit
def scaled_blocks(x_ptr, positions, narrow, wide, scale, seq_len, HEADS, DIM):
    """Blocks A [rows, NARROW] and B [rows, WIDE] of rows of q or k, each row times its scale, in float32."""
    x_narrow = load_columns(
        x_ptr=x_ptr, positions=positions, block=narrow, seq_len=seq_len, HEADS=HEADS, DIM=DIM, WIDTH=NARROW
    )
    x_wide = load_columns(
        x_ptr=x_ptr, positions=positions, block=wide, seq_len=seq_len, HEADS=HEADS, DIM=DIM, WIDTH=WIDE
    )
    return x_narrow.to(tl.float32) * scale, x_wide.to(tl.float32) * scale


def power_state_scan(
    k_ptr,
    v_ptr,
    l_ptr,
    l_lo_ptr,
    narrow_blocks_ptr,
    wide_blocks_ptr,
    s_ptr,
    z_ptr,
    seq_len,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    CHUNK: tl.constexpr,
    FEATURE_TILES: tl.constexpr,
    ROOT_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    VALUE_BLOCK: tl.constexpr,
    VALUE_BLOCKS: tl.constexpr,
):
    """The state entering every chunk, for one feature tile and one block of value columns; the
    running state stays in registers."""
    feature_tile, narrow, wide, multiplicity, value_block = scan_program(
        narrow_blocks_ptr=narrow_blocks_ptr, wide_blocks_ptr=wide_blocks_ptr, VALUE_BLOCKS=VALUE_BLOCKS
    )
    qk_base, v_base, row_base = head_bases(seq_len=seq_len, HEADS=HEADS, DIM=DIM, DIM_V=DIM_V)
    # Every pointer below moves to this program's (batch, head).
    k_ptr += qk_base
    v_ptr += v_base
    l_ptr += row_base
    l_lo_ptr += row_base
    state = tl.zeros([TILE_FEATURES, VALUE_BLOCK], tl.float32)  # [TILE_FEATURES, VALUE_BLOCK]
    norm = tl.zeros([TILE_FEATURES], tl.float32)  # [TILE_FEATURES]
    for chunk in range(tl.cdiv(seq_len, CHUNK)):
        tile_index = state_tile_index(
            chunk=chunk,
            feature_tile=feature_tile,
            seq_len=seq_len,
            HEADS=HEADS,
            CHUNK=CHUNK,
            FEATURE_TILES=FEATURE_TILES,
        )
        store_state_columns(
            s_ptr=s_ptr,
            z_ptr=z_ptr,
            tile_index=tile_index,
            value_block=value_block,
            state=state,
            norm=norm,
            DIM_V=DIM_V,
            VALUE_BLOCK=VALUE_BLOCK,
        )
        decay = tl.exp(chunk_end_gate(l_ptr=l_ptr, chunk=chunk, seq_len=seq_len, HEADS=HEADS, CHUNK=CHUNK))
        state = state * decay
        norm = norm * decay
        for start in range(chunk * CHUNK, (chunk + 1) * CHUNK, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            root_decay = key_root_decay(
                l_ptr=l_ptr,
                l_lo_ptr=l_lo_ptr,
                cols=cols,
                chunk=chunk,
                seq_len=seq_len,
                HEADS=HEADS,
                CHUNK=CHUNK,
                ROOT_SCALE=ROOT_SCALE,
            )
            k_narrow, k_wide = scaled_blocks(
                x_ptr=k_ptr,
                positions=cols,
                narrow=narrow,
                wide=wide,
                scale=root_decay[:, None],
                seq_len=seq_len,
                HEADS=HEADS,
                DIM=DIM,
            )
            phi = (
                tile_features(x_narrow=k_narrow, x_wide=k_wide, ROWS=BLOCK_N) * multiplicity
            )  # [BLOCK_N, TILE_FEATURES]
            v = load_columns(
                x_ptr=v_ptr,
                positions=cols,
                block=value_block,
                seq_len=seq_len,
                HEADS=HEADS,
                DIM=DIM_V,
                WIDTH=VALUE_BLOCK,
            )  # [BLOCK_N, VALUE_BLOCK]
            # [TILE_FEATURES, BLOCK_N] @ [BLOCK_N, VALUE_BLOCK] -> [TILE_FEATURES, VALUE_BLOCK]
            state += tl.dot(tl.trans(as_input(phi, v_ptr)), v)
            norm += tl.sum(phi, axis=0)


@triton.jit
def state_shares(l_ptr, log_normaliser_ptr, rows, seq_len, HEADS):
    """exp(L_i - log normaliser_i) [rows]: how a unit of state numerator or norm weighs in y_i (0 for a row
    with no weight)."""
    L = load_row(x_ptr=l_ptr, positions=rows, seq_len=seq_len, HEADS=HEADS)
    log_normaliser = load_row(x_ptr=log_normaliser_ptr, positions=rows, seq_len=seq_len, HEADS=HEADS)
    return tl.exp(L - log_normaliser)


def power_chunk_forward(
    q_ptr,
    k_ptr,
    v_ptr,
    l_ptr,
    l_lo_ptr,
    s_ptr,
    z_ptr,
    narrow_blocks_ptr,
    wide_blocks_ptr,
    y_ptr,
    log_normaliser_ptr,
    seq_len,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    CHUNK: tl.constexpr,
    FEATURE_TILES: tl.constexpr,
    SCALE: tl.constexpr,
    ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y for one query block: the state entering its chunk, queried, is the first term of the
    running row max and sums; the chunk's keys up to the diagonal follow as in flash attention."""
    block_m = tl.program_id(0)
    qk_base, v_base, row_base = head_bases(seq_len=seq_len, HEADS=HEADS, DIM=DIM, DIM_V=DIM_V)
    # Every pointer below moves to this program's (batch, head).
    q_ptr += qk_base
    k_ptr += qk_base
    v_ptr += v_base
    y_ptr += v_base
    l_ptr += row_base
    l_lo_ptr += row_base
    log_normaliser_ptr += row_base
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = block_m * BLOCK_M // CHUNK
    row_hi, row_lo = load_gates(g_ptr=l_ptr, g_lo_ptr=l_lo_ptr, positions=rows, seq_len=seq_len, HEADS=HEADS)

    numerator = tl.zeros([BLOCK_M, DIM_V], tl.float32)  # [BLOCK_M, DIM_V]
    denominator = tl.zeros([BLOCK_M], tl.float32)  # [BLOCK_M]
    for feature_tile in range(FEATURE_TILES):
        narrow, wide, _ = tile_blocks(
            narrow_blocks_ptr=narrow_blocks_ptr, wide_blocks_ptr=wide_blocks_ptr, feature_tile=feature_tile
        )
        q_narrow, q_wide = scaled_blocks(
            x_ptr=q_ptr,
            positions=rows,
            narrow=narrow,
            wide=wide,
            scale=ROOT_SCALE,
            seq_len=seq_len,
            HEADS=HEADS,
            DIM=DIM,
        )
        phi = tile_features(x_narrow=q_narrow, x_wide=q_wide, ROWS=BLOCK_M)  # [BLOCK_M, TILE_FEATURES]
        tile_index = state_tile_index(
            chunk=chunk,
            feature_tile=feature_tile,
            seq_len=seq_len,
            HEADS=HEADS,
            CHUNK=CHUNK,
            FEATURE_TILES=FEATURE_TILES,
        )
        state, norm = load_state(s_ptr=s_ptr, z_ptr=z_ptr, tile_index=tile_index, DIM_V=DIM_V)
        # [BLOCK_M, TILE_FEATURES] @ [TILE_FEATURES, DIM_V] -> [BLOCK_M, DIM_V]
        numerator += tl.dot(as_input(phi, q_ptr), as_input(state, q_ptr))
        denominator += tl.sum(phi * norm[None, :], axis=1)

    # In the frame of the state's own log weight L_i + log(phi^T z) its weight sum is 1. A
    # state weight that is not positive (no past keys, or round-off around 0) counts as none.
    has_state = denominator > 0
    safe_denominator = tl.where(has_state, denominator, 1.0)
    row_max = tl.where(has_state, row_hi + tl.log(safe_denominator), float("-inf"))  # [BLOCK_M]
    row_sum = tl.where(has_state, 1.0, 0.0)  # [BLOCK_M]
    acc = tl.where(has_state[:, None], numerator / safe_denominator[:, None], 0.0)  # [BLOCK_M, DIM_V]
    q = load_tile(x_ptr=q_ptr, positions=rows, seq_len=seq_len, HEADS=HEADS, DIM=DIM)  # [BLOCK_M, DIM]
    row_max, row_sum, acc = accumulate_keys(
        q=q,
        row_hi=row_hi,
        row_lo=row_lo,
        rows=rows,
        row_max=row_max,
        row_sum=row_sum,
        acc=acc,
        k_ptr=k_ptr,
        v_ptr=v_ptr,
        g_ptr=l_ptr,
        g_lo_ptr=l_lo_ptr,
        key_start=chunk * CHUNK,
        key_end=(block_m + 1) * BLOCK_M,
        seq_len=seq_len,
        HEADS=HEADS,
        DIM=DIM,
        DIM_V=DIM_V,
        SCALE=SCALE,
        POWER=2,
        GATED=True,
        BLOCK_N=BLOCK_N,
    )
    store_outputs(
        y_ptr=y_ptr,
        log_normaliser_ptr=log_normaliser_ptr,
        rows=rows,
        row_max=row_max,
        row_sum=row_sum,
        acc=acc,
        seq_len=seq_len,
        HEADS=HEADS,
        DIM_V=DIM_V,
    )


def power_chunk_backward_queries(
    q_ptr,
    k_ptr,
    v_ptr,
    l_ptr,
    l_lo_ptr,
    dy_ptr,
    delta_ptr,
    log_normaliser_ptr,
    s_ptr,
    z_ptr,
    narrow_blocks_ptr,
    wide_blocks_ptr,
    dq_ptr,
    dl_rows_ptr,
    seq_len,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    CHUNK: tl.constexpr,
    FEATURE_TILES: tl.constexpr,
    SCALE: tl.constexpr,
    ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq and the row part of dL for one query block: the intra-chunk part as in flash attention,
    plus the state part d phi(r q_i) = share_i (S_m dy_i - delta_i z_m), which gives L_i
    phi(r q_i) . d phi(r q_i). (The row part is 0 in exact arithmetic; see power_attention_backward_queries.)"""
    block_m = tl.program_id(0)
    qk_base, v_base, row_base = head_bases(seq_len=seq_len, HEADS=HEADS, DIM=DIM, DIM_V=DIM_V)
    # Every pointer below moves to this program's (batch, head).
    q_ptr += qk_base
    k_ptr += qk_base
    dq_ptr += qk_base
    v_ptr += v_base
    dy_ptr += v_base
    l_ptr += row_base
    l_lo_ptr += row_base
    delta_ptr += row_base
    log_normaliser_ptr += row_base
    dl_rows_ptr += row_base
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = block_m * BLOCK_M // CHUNK
    q, dy, delta, log_normaliser, row_hi, row_lo = load_query_gradients(
        q_ptr=q_ptr,
        dy_ptr=dy_ptr,
        delta_ptr=delta_ptr,
        log_normaliser_ptr=log_normaliser_ptr,
        g_ptr=l_ptr,
        g_lo_ptr=l_lo_ptr,
        rows=rows,
        seq_len=seq_len,
        HEADS=HEADS,
        DIM=DIM,
        DIM_V=DIM_V,
    )
    dq = tl.zeros([BLOCK_M, DIM], tl.float32)  # [BLOCK_M, DIM]
    dl = tl.zeros([BLOCK_M], tl.float32)  # [BLOCK_M]
    dq, dl = accumulate_query_gradients(
        q=q,
        dy=dy,
        delta=delta,
        log_normaliser=log_normaliser,
        row_hi=row_hi,
        row_lo=row_lo,
        rows=rows,
        dq=dq,
        dg=dl,
        k_ptr=k_ptr,
        v_ptr=v_ptr,
        g_ptr=l_ptr,
        g_lo_ptr=l_lo_ptr,
        key_start=chunk * CHUNK,
        key_end=(block_m + 1) * BLOCK_M,
        seq_len=seq_len,
        HEADS=HEADS,
        DIM=DIM,
        DIM_V=DIM_V,
        SCALE=SCALE,
        POWER=2,
        GATED=True,
        BLOCK_N=BLOCK_N,
    )

    share = state_shares(l_ptr=l_ptr, log_normaliser_ptr=log_normaliser_ptr, rows=rows, seq_len=seq_len, HEADS=HEADS)
    d_numerator = as_input(dy * share[:, None], dy_ptr)  # [BLOCK_M, DIM_V]
    d_norm = -delta * share  # [BLOCK_M]
    d_narrow_blocks = tl.zeros([BLOCK_M, DIM // NARROW, NARROW], tl.float32)  # [BLOCK_M, DIM / NARROW, NARROW]
    d_wide_blocks = tl.zeros([BLOCK_M, DIM // WIDE, WIDE], tl.float32)  # [BLOCK_M, DIM / WIDE, WIDE]
    for feature_tile in range(FEATURE_TILES):
        narrow, wide, _ = tile_blocks(
            narrow_blocks_ptr=narrow_blocks_ptr, wide_blocks_ptr=wide_blocks_ptr, feature_tile=feature_tile
        )
        q_narrow, q_wide = scaled_blocks(
            x_ptr=q_ptr,
            positions=rows,
            narrow=narrow,
            wide=wide,
            scale=ROOT_SCALE,
            seq_len=seq_len,
            HEADS=HEADS,
            DIM=DIM,
        )
        tile_index = state_tile_index(
            chunk=chunk,
            feature_tile=feature_tile,
            seq_len=seq_len,
            HEADS=HEADS,
            CHUNK=CHUNK,
            FEATURE_TILES=FEATURE_TILES,
        )
        state, norm = load_state(s_ptr=s_ptr, z_ptr=z_ptr, tile_index=tile_index, DIM_V=DIM_V)
        # [BLOCK_M, DIM_V] @ [DIM_V, TILE_FEATURES] -> [BLOCK_M, TILE_FEATURES]
        d_phi = tl.dot(d_numerator, tl.trans(as_input(state, dy_ptr))) + d_norm[:, None] * norm[None, :]
        dl += tl.sum(tile_features(x_narrow=q_narrow, x_wide=q_wide, ROWS=BLOCK_M) * d_phi, axis=1)
        d_narrow_blocks, d_wide_blocks = add_tile_gradient(
            d_narrow_blocks=d_narrow_blocks,
            d_wide_blocks=d_wide_blocks,
            d_features=d_phi,
            x_narrow=q_narrow,
            x_wide=q_wide,
            narrow=narrow,
            wide=wide,
            ROWS=BLOCK_M,
            DIM=DIM,
        )
    d_q_state = joined_gradient(d_narrow_blocks=d_narrow_blocks, d_wide_blocks=d_wide_blocks, ROWS=BLOCK_M, DIM=DIM)
    store_tile(x_ptr=dq_ptr, positions=rows, tile=dq + d_q_state * ROOT_SCALE, seq_len=seq_len, HEADS=HEADS, DIM=DIM)
    store_row(x_ptr=dl_rows_ptr, positions=rows, row=dl, seq_len=seq_len, HEADS=HEADS)


def power_state_scan_backward(
    q_ptr,
    l_ptr,
    dy_ptr,
    delta_ptr,
    log_normaliser_ptr,
    s_ptr,
    z_ptr,
    narrow_blocks_ptr,
    wide_blocks_ptr,
    ds_ptr,
    dz_ptr,
    d_end_gate_ptr,
    seq_len,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    CHUNK: tl.constexpr,
    FEATURE_TILES: tl.constexpr,
    ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    VALUE_BLOCK: tl.constexpr,
    VALUE_BLOCKS: tl.constexpr,
):
    """The scan run backwards, for one feature tile and one block of value columns. With dS_m the
    gradient of the state entering chunk m: dS_m = exp(E_m) dS_{m+1} + sum_{i in m} phi(r q_i)
    share_i dy_i^T (the norm likewise with -share_i delta_i), dS_{last + 1} = 0. Stores, per
    chunk, dS_{m+1} (the gradient of the chunk's own contribution) and this program's part of
    exp(E_m) <S_m, dS_{m+1}> (its end gate's; the norm's part in the first column block)."""
    feature_tile, narrow, wide, _, value_block = scan_program(
        narrow_blocks_ptr=narrow_blocks_ptr, wide_blocks_ptr=wide_blocks_ptr, VALUE_BLOCKS=VALUE_BLOCKS
    )
    qk_base, v_base, row_base = head_bases(seq_len=seq_len, HEADS=HEADS, DIM=DIM, DIM_V=DIM_V)
    # Every pointer below moves to this program's (batch, head).
    q_ptr += qk_base
    dy_ptr += v_base
    l_ptr += row_base
    delta_ptr += row_base
    log_normaliser_ptr += row_base
    d_state = tl.zeros([TILE_FEATURES, VALUE_BLOCK], tl.float32)  # [TILE_FEATURES, VALUE_BLOCK]
    d_norm = tl.zeros([TILE_FEATURES], tl.float32)  # [TILE_FEATURES]
    chunks = tl.cdiv(seq_len, CHUNK)
    for step in range(chunks):
        chunk = chunks - 1 - step
        tile_index = state_tile_index(
            chunk=chunk,
            feature_tile=feature_tile,
            seq_len=seq_len,
            HEADS=HEADS,
            CHUNK=CHUNK,
            FEATURE_TILES=FEATURE_TILES,
        )
        store_state_columns(
            s_ptr=ds_ptr,
            z_ptr=dz_ptr,
            tile_index=tile_index,
            value_block=value_block,
            state=d_state,
            norm=d_norm,
            DIM_V=DIM_V,
            VALUE_BLOCK=VALUE_BLOCK,
        )
        decay = tl.exp(chunk_end_gate(l_ptr=l_ptr, chunk=chunk, seq_len=seq_len, HEADS=HEADS, CHUNK=CHUNK))
        state = tl.load(
            s_ptr + state_offsets(tile_index=tile_index, value_block=value_block, DIM_V=DIM_V, WIDTH=VALUE_BLOCK)
        )
        through_norm = tl.where(value_block == 0, tl.sum(load_norm(z_ptr=z_ptr, tile_index=tile_index) * d_norm), 0.0)
        tl.store(
            d_end_gate_ptr + tile_index * VALUE_BLOCKS + value_block, decay * (tl.sum(state * d_state) + through_norm)
        )
        d_state = d_state * decay
        d_norm = d_norm * decay
        for start in range(chunk * CHUNK, (chunk + 1) * CHUNK, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q_narrow, q_wide = scaled_blocks(
                x_ptr=q_ptr,
                positions=rows,
                narrow=narrow,
                wide=wide,
                scale=ROOT_SCALE,
                seq_len=seq_len,
                HEADS=HEADS,
                DIM=DIM,
            )
            phi = tile_features(x_narrow=q_narrow, x_wide=q_wide, ROWS=BLOCK_M)  # [BLOCK_M, TILE_FEATURES]
            share = state_shares(
                l_ptr=l_ptr, log_normaliser_ptr=log_normaliser_ptr, rows=rows, seq_len=seq_len, HEADS=HEADS
            )  # [BLOCK_M]
            dy = load_columns(
                x_ptr=dy_ptr,
                positions=rows,
                block=value_block,
                seq_len=seq_len,
                HEADS=HEADS,
                DIM=DIM_V,
                WIDTH=VALUE_BLOCK,
            )  # [BLOCK_M, VALUE_BLOCK]
            delta = load_row(x_ptr=delta_ptr, positions=rows, seq_len=seq_len, HEADS=HEADS)  # [BLOCK_M]
            # [TILE_FEATURES, BLOCK_M] @ [BLOCK_M, VALUE_BLOCK] -> [TILE_FEATURES, VALUE_BLOCK]
            d_state += tl.dot(tl.trans(as_input(phi, dy_ptr)), as_input(dy * share[:, None], dy_ptr))
            d_norm -= tl.sum(phi * (delta * share)[:, None], axis=0)


def power_chunk_backward_keys(
    q_ptr,
    k_ptr,
    v_ptr,
    l_ptr,
    l_lo_ptr,
    dy_ptr,
    delta_ptr,
    log_normaliser_ptr,
    ds_ptr,
    dz_ptr,
    narrow_blocks_ptr,
    wide_blocks_ptr,
    dk_ptr,
    dv_ptr,
    dl_ptr,
    through_state_ptr,
    seq_len,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    CHUNK: tl.constexpr,
    FEATURE_TILES: tl.constexpr,
    SCALE: tl.constexpr,
    ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dk, dv and dL for one key block: from the chunk's queries as in flash attention, and from
    the key's share in the state after its chunk, c phi(x_j) v_j^T with x_j = r exp((E_m - L_j)/2) k_j.
    through_state_j = sum c phi(x_j) . (dS v_j + dz) is what that term gives dE_m; it takes as much from L_j."""
    block_n = tl.program_id(0)
    qk_base, v_base, row_base = head_bases(seq_len=seq_len, HEADS=HEADS, DIM=DIM, DIM_V=DIM_V)
    # Every pointer below moves to this program's (batch, head).
    q_ptr += qk_base
    k_ptr += qk_base
    dk_ptr += qk_base
    v_ptr += v_base
    dy_ptr += v_base
    dv_ptr += v_base
    l_ptr += row_base
    l_lo_ptr += row_base
    delta_ptr += row_base
    log_normaliser_ptr += row_base
    dl_ptr += row_base
    through_state_ptr += row_base
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = block_n * BLOCK_N // CHUNK
    k, v, col_hi, col_lo = load_keys(
        k_ptr=k_ptr,
        v_ptr=v_ptr,
        g_ptr=l_ptr,
        g_lo_ptr=l_lo_ptr,
        cols=cols,
        seq_len=seq_len,
        HEADS=HEADS,
        DIM=DIM,
        DIM_V=DIM_V,
    )
    dk = tl.zeros([BLOCK_N, DIM], tl.float32)  # [BLOCK_N, DIM]
    dv = tl.zeros([BLOCK_N, DIM_V], tl.float32)  # [BLOCK_N, DIM_V]
    dl = tl.zeros([BLOCK_N], tl.float32)  # [BLOCK_N]
    dk, dv, dl = accumulate_key_gradients(
        k=k,
        v=v,
        col_hi=col_hi,
        col_lo=col_lo,
        cols=cols,
        dk=dk,
        dv=dv,
        dg=dl,
        q_ptr=q_ptr,
        dy_ptr=dy_ptr,
        delta_ptr=delta_ptr,
        log_normaliser_ptr=log_normaliser_ptr,
        g_ptr=l_ptr,
        g_lo_ptr=l_lo_ptr,
        query_start=(block_n * BLOCK_N // BLOCK_M) * BLOCK_M,
        query_end=tl.minimum((chunk + 1) * CHUNK, seq_len),
        seq_len=seq_len,
        HEADS=HEADS,
        DIM=DIM,
        DIM_V=DIM_V,
        SCALE=SCALE,
        POWER=2,
        GATED=True,
        BLOCK_M=BLOCK_M,
    )

    root_decay = key_root_decay(
        l_ptr=l_ptr,
        l_lo_ptr=l_lo_ptr,
        cols=cols,
        chunk=chunk,
        seq_len=seq_len,
        HEADS=HEADS,
        CHUNK=CHUNK,
        ROOT_SCALE=ROOT_SCALE,
    )  # [BLOCK_N]
    d_narrow_blocks = tl.zeros([BLOCK_N, DIM // NARROW, NARROW], tl.float32)  # [BLOCK_N, DIM / NARROW, NARROW]
    d_wide_blocks = tl.zeros([BLOCK_N, DIM // WIDE, WIDE], tl.float32)  # [BLOCK_N, DIM / WIDE, WIDE]
    through_state = tl.zeros([BLOCK_N], tl.float32)  # [BLOCK_N]
    for feature_tile in range(FEATURE_TILES):
        narrow, wide, multiplicity = tile_blocks(
            narrow_blocks_ptr=narrow_blocks_ptr, wide_blocks_ptr=wide_blocks_ptr, feature_tile=feature_tile
        )
        k_narrow, k_wide = scaled_blocks(
            x_ptr=k_ptr,
            positions=cols,
            narrow=narrow,
            wide=wide,
            scale=root_decay[:, None],
            seq_len=seq_len,
            HEADS=HEADS,
            DIM=DIM,
        )
        phi = tile_features(x_narrow=k_narrow, x_wide=k_wide, ROWS=BLOCK_N) * multiplicity  # [BLOCK_N, TILE_FEATURES]
        tile_index = state_tile_index(
            chunk=chunk,
            feature_tile=feature_tile,
            seq_len=seq_len,
            HEADS=HEADS,
            CHUNK=CHUNK,
            FEATURE_TILES=FEATURE_TILES,
        )
        d_state, d_norm = load_state(s_ptr=ds_ptr, z_ptr=dz_ptr, tile_index=tile_index, DIM_V=DIM_V)
        # [BLOCK_N, TILE_FEATURES] @ [TILE_FEATURES, DIM_V] -> [BLOCK_N, DIM_V]
        dv += tl.dot(as_input(phi, v_ptr), d_state)
        # [BLOCK_N, DIM_V] @ [DIM_V, TILE_FEATURES] -> [BLOCK_N, TILE_FEATURES]
        d_phi = tl.dot(v, tl.trans(d_state)) + d_norm[None, :]
        through_state += tl.sum(phi * d_phi, axis=1)
        d_narrow_blocks, d_wide_blocks = add_tile_gradient(
            d_narrow_blocks=d_narrow_blocks,
            d_wide_blocks=d_wide_blocks,
            d_features=d_phi * multiplicity,
            x_narrow=k_narrow,
            x_wide=k_wide,
            narrow=narrow,
            wide=wide,
            ROWS=BLOCK_N,
            DIM=DIM,
        )
    d_k_state = joined_gradient(d_narrow_blocks=d_narrow_blocks, d_wide_blocks=d_wide_blocks, ROWS=BLOCK_N, DIM=DIM)
    dk += d_k_state * root_decay[:, None]
    store_tile(x_ptr=dk_ptr, positions=cols, tile=dk, seq_len=seq_len, HEADS=HEADS, DIM=DIM)
    store_tile(x_ptr=dv_ptr, positions=cols, tile=dv, seq_len=seq_len, HEADS=HEADS, DIM=DIM_V)
    store_row(x_ptr=dl_ptr, positions=cols, row=dl - through_state, seq_len=seq_len, HEADS=HEADS)
    store_row(x_ptr=through_state_ptr, positions=cols, row=through_state, seq_len=seq_len, HEADS=HEADS)


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


def gpu_tilings(dim: int, itemsize: int) -> dict:
    """Each kernel's GPU tiling for q and k rows of dim elements of itemsize bytes: 64 rows and
    8 warps. The backward chunk kernels take 32 rows of keys a tile, 32 rows of queries too
    unless bf16 at dim <= 64, and 3 pipeline stages for bf16, 2 for float32. Compiled for sm_90
    at dims 16..128 as jax-triton compiles them (tests/test_triton.py), ptxas spills at most a
    few bytes a thread with these and none in the scans, the forward kernel and anything at dim
    64 in bf16 (the figures, per Triton version: docs/decisions.md). Chosen to compile, not yet
    timed: tools.tune times them against larger tiles and other stages."""
    bf16 = itemsize == 2
    backward = Tiling(64 if bf16 and dim <= 64 else 32, 32, num_warps=8, num_stages=3 if bf16 else 2)
    return {
        power_state_scan: Tiling(64, 64, num_warps=8),
        power_chunk_forward: Tiling(64, 64, num_warps=8),
        power_chunk_backward_queries: backward,
        power_state_scan_backward: Tiling(64, 64, num_warps=8),
        power_chunk_backward_keys: backward,
    }


def chunk_multiple(q, options: LaunchOptions) -> int:
    """chunk_size must be a multiple of every tile's rows, so that no tile straddles two chunks."""
    tilings = options.tilings(gpu_tilings, q.shape[-1], q.dtype.itemsize)
    return max(max(t.query_rows, t.key_rows) for t in tilings.values())


class ChunkedPlan(NamedTuple):
    """The five kernels' launches for one problem, with the shapes of the per-chunk states they
    pass between them and the feature tile tables."""

    launches: Plan
    state: jax.ShapeDtypeStruct  # [batch, chunks, heads, feature tiles, TILE_FEATURES, dim_v]
    norm: jax.ShapeDtypeStruct  # [batch, chunks, heads, feature tiles, TILE_FEATURES]
    rows: jax.ShapeDtypeStruct  # [batch, seq, heads]
    tables: list[jax.Array]


def chunked_plan(q, v, scale: float, chunk_size: int, options: LaunchOptions) -> ChunkedPlan:
    """Programs per block of query (or key) rows and per batch x head; the scans' per feature
    tile x block of value columns and per batch x head. The kernels count chunks from seq_len."""
    batch, seq, heads, dim = q.shape
    dim_v = v.shape[-1]
    tilings = options.tilings(gpu_tilings, dim, q.dtype.itemsize)
    tables = tile_tables(dim)
    value_block = min(dim_v, options.scan_value_columns)
    scalars = dict(
        seq_len=seq,
        HEADS=heads,
        DIM=dim,
        DIM_V=dim_v,
        CHUNK=chunk_size,
        FEATURE_TILES=len(tables[0]),
        SCALE=scale,
        ROOT_SCALE=math.sqrt(scale),
        VALUE_BLOCK=value_block,
        VALUE_BLOCKS=dim_v // value_block,
    )
    scan_grid = (len(tables[0]) * scalars["VALUE_BLOCKS"], batch * heads)
    row_blocks = {
        power_chunk_forward: tilings[power_chunk_forward].query_rows,
        power_chunk_backward_queries: tilings[power_chunk_backward_queries].query_rows,
        power_chunk_backward_keys: tilings[power_chunk_backward_keys].key_rows,
    }
    grids = {power_state_scan: scan_grid, power_state_scan_backward: scan_grid}
    grids |= {kernel: (math.ceil(seq / rows), batch * heads) for kernel, rows in row_blocks.items()}
    state = jax.ShapeDtypeStruct(
        (batch, math.ceil(seq / chunk_size), heads, len(tables[0]), NARROW_BLOCK * WIDE_BLOCK, dim_v), jnp.float32
    )
    return ChunkedPlan(
        launches=Plan(options.runs_compiled(), tilings, grids, scalars),
        state=state,
        norm=jax.ShapeDtypeStruct(state.shape[:-1], jnp.float32),
        rows=jax.ShapeDtypeStruct((batch, seq, heads), jnp.float32),
        tables=[jnp.asarray(t) for t in tables],
    )


def chunk_gates(log_g, chunk_size: int):
    """L: the cumulative gate restarted at each chunk, [batch, seq, heads], as a pair (hi, lo) of
    float32. Differences of L (intra-chunk weights, key decays to the chunk end) take both
    parts, as the flash kernels do; decays from the chunk's start, exp(E_m) and exp(L_i), take
    hi, as ops.sympow.chunk does."""
    L = chunk_local_gates(split_chunks(log_g, chunk_size))
    return tuple(part.reshape(log_g.shape[0], -1, log_g.shape[2])[:, : log_g.shape[1]] for part in L)


def chunked_forward(q, k, v, L, scale: float, chunk_size: int, options: LaunchOptions = LaunchOptions()):
    """(y, log normaliser, S, z) through the state scan and the chunk output kernel; L as (hi, lo)."""
    plan = chunked_plan(q, v, scale, chunk_size, options)
    S, z = plan.launches.launch(power_state_scan, [k, v, *L, *plan.tables], [plan.state, plan.norm])
    y_shape = jax.ShapeDtypeStruct(v.shape, v.dtype)
    y, log_normaliser = plan.launches.launch(
        power_chunk_forward, [q, k, v, *L, S, z, *plan.tables], [y_shape, plan.rows]
    )
    return y, log_normaliser, S, z


def chunked_backward(
    q,
    k,
    v,
    L,
    y,
    log_normaliser,
    S,
    z,
    dy,
    scale: float,
    chunk_size: int,
    options: LaunchOptions = LaunchOptions(),
    d_log_normaliser=None,
):
    """(dq, dk, dv, dL) through the three backward kernels; dL is the gradient of the chunk-local
    gates. d_log_normaliser: a gradient in the log-normaliser too (see `log_weight_delta`)."""
    plan = chunked_plan(q, v, scale, chunk_size, options)
    launch = plan.launches.launch
    delta = log_weight_delta(dy, y, d_log_normaliser)
    rows = [q, k, v, *L, dy, delta, log_normaliser]
    like = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    dq, dL_rows = launch(power_chunk_backward_queries, [*rows, S, z, *plan.tables], [like[0], plan.rows])
    # dS is only ever a matmul operand, so it is stored in the inputs' dtype: no extra rounding,
    # half the bytes the keys kernel reads for bf16. S stays float32 for its end gate's gradient.
    d_end_gate_parts = jax.ShapeDtypeStruct((*plan.state.shape[:4], plan.launches.scalars["VALUE_BLOCKS"]), jnp.float32)
    d_state, d_norm, d_end_gate = launch(
        power_state_scan_backward,
        [q, L[0], dy, delta, log_normaliser, S, z, *plan.tables],
        [plan.state.update(dtype=v.dtype), plan.norm, d_end_gate_parts],
    )
    dk, dv, dL_columns, through_state = launch(
        power_chunk_backward_keys, [*rows, d_state, d_norm, *plan.tables], [like[1], like[2], plan.rows, plan.rows]
    )
    # E_m is L at chunk m's last position: it collects the scan's part and the keys' parts.
    d_end = jnp.sum(d_end_gate, axis=(3, 4)) + jnp.sum(
        split_chunks(through_state, chunk_size), axis=2
    )  # [batch, chunks, heads]
    dL = split_chunks(dL_rows + dL_columns, chunk_size).at[:, :, -1].add(d_end)
    return dq, dk, dv, dL


class ChunkedResiduals(NamedTuple):
    """What the forward pass keeps for the backward pass."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    L: tuple[jax.Array, jax.Array]
    y: jax.Array
    log_normaliser: jax.Array
    S: jax.Array
    z: jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def triton_chunked(q, k, v, log_g, scale: float, chunk_size: int, options: LaunchOptions = LaunchOptions()):
    """Gated power attention with p = 2 through the chunked Triton kernels: y and the log of its
    normaliser (log sum_j w_ij), differentiable in q, k, v and log_g."""
    y, log_normaliser, *_ = chunked_forward(q, k, v, chunk_gates(log_g, chunk_size), scale, chunk_size, options)
    return y, log_normaliser


def triton_chunked_forward(q, k, v, log_g, scale, chunk_size, options):
    L = chunk_gates(log_g, chunk_size)
    y, log_normaliser, S, z = chunked_forward(q, k, v, L, scale, chunk_size, options)
    return (y, log_normaliser), ChunkedResiduals(q, k, v, L, y, log_normaliser, S, z)


def triton_chunked_backward(scale, chunk_size, options, saved: ChunkedResiduals, cotangents):
    dy, d_log_normaliser = cotangents
    dq, dk, dv, dL = chunked_backward(*saved, dy, scale, chunk_size, options, d_log_normaliser)
    # L_t sums log_g over its chunk up to t, so d log_g_u sums dL_t over t >= u in u's chunk.
    d_log_g = reverse_cumsum(dL, axis=2)
    batch, seq, heads, _ = dq.shape
    return dq, dk, dv, d_log_g.reshape(batch, -1, heads)[:, :seq].astype(saved.L[0].dtype)


triton_chunked.defvjp(triton_chunked_forward, triton_chunked_backward)


def chunked(q, k, v, log_g, scale: float, chunk_size: int, options: LaunchOptions = LaunchOptions()):
    """Gated power attention with p = 2 through the chunked kernels (O(T c d + T D' d) work, states
    per chunk): (y, log normaliser)."""
    check_dims(q, v)
    multiple = chunk_multiple(q, options)
    if chunk_size % multiple:
        raise ValueError(
            f"impl='triton' needs chunk_size a multiple of {multiple} here (tiles do not straddle chunks); "
            f"got {chunk_size}"
        )
    log_g = jnp.zeros(q.shape[:3], jnp.float32) if log_g is None else log_g.astype(jnp.float32)
    return triton_chunked(q, k, v, log_g, scale, chunk_size, options)
