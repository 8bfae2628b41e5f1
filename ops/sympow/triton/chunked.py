"""The chunked path for p = 2 in Triton: the state scan, the state query fused with the
intra-chunk attention and the normalisation, and their backward kernels.

The state uses a tiled layout of phi_2. The head dim splits into blocks of FB = 16 dims; for
each pair of blocks P <= B and each quarter A of P (FA = 4 dims) the feature tile is
vec(x_A outer x_B) (FA FB = 64 features), weighted c = 1 when P = B and 2 otherwise, so that
    sum over tiles c vec(x_A x_B^T) . vec(y_A y_B^T) = sum_{P <= B} c (x_P . y_P)(x_B . y_B) = (x . y)^2.
That is D' = n(n + 1)/2 FB^2 features for n = dim / FB (2560 at dim 64, against the exact 2080):
a little redundancy on the diagonal buys dense 64-row matmuls, and the features are made in
registers from rows of q or k, so phi(Q) and phi(K) never go to memory. Tiles are this narrow
for registers: at 64 rows of q or k and 8 warps, ptxas (sm_90) spilled 544 bytes a thread in
the backward keys kernel with 16 x 16 tiles, 160 with 8 x 16, and none with 4 x 16.

Per batch x head, with L the chunk-local cumulative gate and E_m the last L of chunk m
(as in ops.sympow.chunk):
    S_0 = 0,  S_{m+1} = exp(E_m) S_m + sum_{j in m} c phi(exp((E_m - L_j)/2) r k_j) v_j^T   (z likewise, with 1)
    y_i = [exp(L_i) phi(r q_i)^T S_m + sum_{j in m, j <= i} w_ij v_j] / [the same with z and 1]
with r = sqrt(scale) and w_ij the gated power weights inside the chunk, evaluated in log
space by the flash-attention helpers. The running states and the stored S and z are float32;
the state matmuls take their operands (phi, S, v, dy and the stored state gradient dS) in the
inputs' dtype and accumulate in float32, as flash attention does with its weights: bf16 inputs
take bf16 tensor-core matmuls, at twice TF32's rate. Emulated on a CPU in the pure-JAX chunked
form (benchmarks/bf16_state_operands.py), that changes the bf16 precision rule's errors by 0.94x
to 1.19x (the rule allows 2x): the inputs' own rounding dominates.

Kernels:
    power_state_scan           (pair x value columns, batch x head): S_m for every chunk, one chunk after another.
    power_chunk_forward        (query block, batch x head): y and the log-normaliser.
    power_chunk_backward_queries  (query block, batch x head): dq and the row part of dL.
    power_state_scan_backward  (pair x value columns, batch x head): the gradient of each chunk's state
                               contribution, and of its end gate through the decay.
    power_chunk_backward_keys  (key block, batch x head): dk, dv and the column part of dL.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from ops.exact import exact_cumsum
from ops.sympow.chunk import split_chunks
from ops.sympow.triton.attention import (
    accumulate_key_gradients,
    accumulate_keys,
    accumulate_query_gradients,
    check_dims,
    head_bases,
    load_block,
    load_gates,
    load_row,
    load_tile,
    log_weight_delta,
    store_outputs,
    store_row,
    store_tile,
)
from ops.sympow.triton.launch import Tiling, launch, tilings

SECOND_BLOCK = 16  # FB: the smallest width tl.dot takes
FIRST_BLOCK = 4  # FA: a quarter of one
# The scans run one program per (pair, block of this many value columns, batch x head), each
# sequential over chunks: at dim 64, batch 1 and 8 heads that is 640 programs for an H100's 132
# SMs, with half the registers for the running state that whole columns would take.
SCAN_VALUE_COLUMNS = 32


# States are [batch, chunks, heads, pairs, FA FB, dim_v] and norms [batch, chunks, heads, pairs, FA FB];
# the tables FIRST and SECOND give each pair's blocks (A, B), A in units of FA dims and B of FB.
@triton.jit
def state_tile(chunk, pair, SEQ, HEADS, CHUNK, PAIRS):
    """Index of this program's (batch, chunk, head, pair) in the [batch, chunks, heads, pairs] grid
    of tiles, in int64: times the FA FB x dim_v elements of a tile it can pass 2^31."""
    batch_head = tl.program_id(1).to(tl.int64)
    batch, head = batch_head // HEADS, batch_head % HEADS
    return ((batch * tl.cdiv(SEQ, CHUNK) + chunk) * HEADS + head) * PAIRS + pair


@triton.jit
def state_offsets(tile, value_block, FEATURES, DIM_V, WIDTH):
    """Offsets of columns value_block * WIDTH .. (value_block + 1) * WIDTH of a [FA FB, dim_v] state tile."""
    columns = value_block * WIDTH + tl.arange(0, WIDTH)
    return tile * FEATURES * DIM_V + tl.arange(0, FEATURES)[:, None] * DIM_V + columns[None, :]


@triton.jit
def load_norm(Z, tile, FEATURES):
    return tl.load(Z + tile * FEATURES + tl.arange(0, FEATURES))


@triton.jit
def load_state(S, Z, tile, FEATURES, DIM_V):
    """A whole state tile and its norm."""
    return tl.load(S + state_offsets(tile, 0, FEATURES, DIM_V, DIM_V)), load_norm(Z, tile, FEATURES)


@triton.jit
def store_state_columns(S, Z, tile, value_block, state, norm, FEATURES, DIM_V, VALUE_BLOCK):
    """One column block of a state tile; its norm is stored by the first column block only."""
    tl.store(S + state_offsets(tile, value_block, FEATURES, DIM_V, VALUE_BLOCK), state)
    features = tl.arange(0, FEATURES)
    tl.store(Z + tile * FEATURES + features, norm, mask=features < tl.where(value_block == 0, FEATURES, 0))


@triton.jit
def scan_program(FIRST, SECOND, FA, FB, VALUE_BLOCKS):
    """The pair, its blocks (A, B) and weight, and the value column block of a scan program:
    program axis 0 runs over pairs x column blocks."""
    pair, value_block = tl.program_id(0) // VALUE_BLOCKS, tl.program_id(0) % VALUE_BLOCKS
    first, second, weight = pair_blocks(FIRST, SECOND, pair, FA, FB)
    return pair, first, second, weight, value_block


@triton.jit
def pair_features(x_first, x_second, ROWS, FA, FB):
    """vec(x_A outer x_B) for each row: [ROWS, FA FB]."""
    return tl.reshape(x_first[:, :, None] * x_second[:, None, :], (ROWS, FA * FB))


@triton.jit
def pair_feature_gradient(d_features, x_first, x_second, ROWS, FA, FB):
    """The gradient of sum(d_features * vec(x_A outer x_B)) in x_A and in x_B."""
    d_outer = tl.reshape(d_features, (ROWS, FA, FB))
    return tl.sum(d_outer * x_second[:, None, :], axis=2), tl.sum(d_outer * x_first[:, :, None], axis=1)


@triton.jit
def into_block(d_block, block, ROWS, N, WIDTH):
    """d_block [ROWS, WIDTH] placed at block `block` of a [ROWS, N, WIDTH] split of the head dim, zeros elsewhere."""
    return tl.where(tl.arange(0, N)[None, :, None] == block, d_block[:, None, :], 0.0)


@triton.jit
def add_pair_gradient(d_first_blocks, d_second_blocks, d_features, x_first, x_second, first, second, ROWS, FA, FB, N_A, N_B):
    """Add the gradient of sum(d_features * vec(x_A outer x_B)) to the gradients of the head dim
    split in blocks of FA ([ROWS, N_A, FA]) and of FB ([ROWS, N_B, FB])."""
    d_first, d_second = pair_feature_gradient(d_features, x_first, x_second, ROWS, FA, FB)
    return d_first_blocks + into_block(d_first, first, ROWS, N_A, FA), d_second_blocks + into_block(d_second, second, ROWS, N_B, FB)


@triton.jit
def joined_gradient(d_first_blocks, d_second_blocks, ROWS, DIM):
    return tl.reshape(d_first_blocks, (ROWS, DIM)) + tl.reshape(d_second_blocks, (ROWS, DIM))


@triton.jit
def as_input(x, X):
    """x in the dtype of the inputs X points to, as a state matmul's operand (accumulated in float32)."""
    return x.to(X.dtype.element_ty)


@triton.jit
def pair_blocks(FIRST, SECOND, pair, FA, FB):
    """Blocks (A, B) of a pair and its weight c: 1 when A is a quarter of B, else 2."""
    first, second = tl.load(FIRST + pair), tl.load(SECOND + pair)
    return first, second, tl.where(first // (FB // FA) == second, 1.0, 2.0)


@triton.jit
def chunk_end_gate(L, row_base, chunk, SEQ, HEADS, CHUNK):
    """E_m: L (or its lo part) at the last position of chunk m (the last real one, for a partial chunk)."""
    return tl.load(L + row_base + (tl.minimum((chunk + 1) * CHUNK, SEQ) - 1) * HEADS)


@triton.jit
def key_root_decay(L, L_LO, row_base, cols, chunk, SEQ, HEADS, CHUNK, ROOT_SCALE):
    """r exp((E_m - L_j) / 2), which makes phi of the scaled key carry the decay exp(E_m - L_j);
    E_m - L_j from hi and lo apart, as the intra-chunk weights take L_i - L_j."""
    end_hi, end_lo = chunk_end_gate(L, row_base, chunk, SEQ, HEADS, CHUNK), chunk_end_gate(L_LO, row_base, chunk, SEQ, HEADS, CHUNK)
    hi, lo = load_gates(L, L_LO, row_base, cols, SEQ, HEADS)
    return tl.exp(((end_hi - hi) + (end_lo - lo)) * 0.5) * ROOT_SCALE


def power_state_scan(
    K, V, L, L_LO, FIRST, SECOND, S, Z,
    SEQ, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, CHUNK: tl.constexpr,
    FA: tl.constexpr, FB: tl.constexpr, N_A: tl.constexpr, N_B: tl.constexpr, PAIRS: tl.constexpr, SCALE: tl.constexpr, ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VALUE_BLOCK: tl.constexpr, VALUE_BLOCKS: tl.constexpr,
):
    """The state entering every chunk, for one pair of feature blocks and one block of value
    columns; the running state stays in registers."""
    pair, first, second, weight, value_block = scan_program(FIRST, SECOND, FA, FB, VALUE_BLOCKS)
    tile_base, value_base, row_base = head_bases(SEQ, HEADS, DIM, DIM_V)
    state = tl.zeros([FA * FB, VALUE_BLOCK], tl.float32)
    norm = tl.zeros([FA * FB], tl.float32)
    for chunk in range(tl.cdiv(SEQ, CHUNK)):
        store_state_columns(S, Z, state_tile(chunk, pair, SEQ, HEADS, CHUNK, PAIRS), value_block, state, norm, FA * FB, DIM_V, VALUE_BLOCK)
        decay = tl.exp(chunk_end_gate(L, row_base, chunk, SEQ, HEADS, CHUNK))
        state = state * decay
        norm = norm * decay
        for start in range(chunk * CHUNK, (chunk + 1) * CHUNK, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            root_decay = key_root_decay(L, L_LO, row_base, cols, chunk, SEQ, HEADS, CHUNK, ROOT_SCALE)[:, None]
            k_first = load_block(K, tile_base, cols, first, SEQ, HEADS, DIM, FA) * root_decay
            k_second = load_block(K, tile_base, cols, second, SEQ, HEADS, DIM, FB) * root_decay
            phi = pair_features(k_first, k_second, BLOCK_N, FA, FB) * weight
            v = load_block(V, value_base, cols, value_block, SEQ, HEADS, DIM_V, VALUE_BLOCK)
            state += tl.dot(tl.trans(as_input(phi, V)), v)
            norm += tl.sum(phi, axis=0)


@triton.jit
def query_blocks(Q, tile_base, rows, first, second, SEQ, HEADS, DIM, FA, FB, ROOT_SCALE):
    """Blocks A and B of r q for these rows, in float32."""
    q_first = load_block(Q, tile_base, rows, first, SEQ, HEADS, DIM, FA).to(tl.float32) * ROOT_SCALE
    q_second = load_block(Q, tile_base, rows, second, SEQ, HEADS, DIM, FB).to(tl.float32) * ROOT_SCALE
    return q_first, q_second


def power_chunk_forward(
    Q, K, V, L, L_LO, S, Z, FIRST, SECOND, Y, LOG_NORMALISER,
    SEQ, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, CHUNK: tl.constexpr,
    FA: tl.constexpr, FB: tl.constexpr, N_A: tl.constexpr, N_B: tl.constexpr, PAIRS: tl.constexpr, SCALE: tl.constexpr, ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VALUE_BLOCK: tl.constexpr, VALUE_BLOCKS: tl.constexpr,
):
    """y for one query block: the state entering its chunk, queried, is the first term of the
    running row max and sums; the chunk's keys up to the diagonal follow as in flash attention."""
    block_m = tl.program_id(0)
    tile_base, value_base, row_base = head_bases(SEQ, HEADS, DIM, DIM_V)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = block_m * BLOCK_M // CHUNK
    gate_rows, gate_rows_lo = load_gates(L, L_LO, row_base, rows, SEQ, HEADS)

    numerator = tl.zeros([BLOCK_M, DIM_V], tl.float32)
    denominator = tl.zeros([BLOCK_M], tl.float32)
    for pair in range(PAIRS):
        first, second, _ = pair_blocks(FIRST, SECOND, pair, FA, FB)
        q_first, q_second = query_blocks(Q, tile_base, rows, first, second, SEQ, HEADS, DIM, FA, FB, ROOT_SCALE)
        phi = pair_features(q_first, q_second, BLOCK_M, FA, FB)
        state, norm = load_state(S, Z, state_tile(chunk, pair, SEQ, HEADS, CHUNK, PAIRS), FA * FB, DIM_V)
        numerator += tl.dot(as_input(phi, Q), as_input(state, Q))
        denominator += tl.sum(phi * norm[None, :], axis=1)

    # In the frame of the state's own log weight L_i + log(phi^T z) its weight sum is 1. A
    # state weight that is not positive (no past keys, or round-off around 0) counts as none.
    has_state = denominator > 0
    row_max = tl.where(has_state, gate_rows + tl.log(tl.where(has_state, denominator, 1.0)), float("-inf"))
    row_sum = tl.where(has_state, 1.0, 0.0)
    acc = tl.where(has_state[:, None], numerator / tl.where(has_state, denominator, 1.0)[:, None], 0.0)
    q = load_tile(Q, tile_base, rows, SEQ, HEADS, DIM)
    row_max, row_sum, acc = accumulate_keys(
        q, gate_rows, gate_rows_lo, rows, row_max, row_sum, acc, K, V, L, L_LO, tile_base, value_base, row_base, chunk * CHUNK, (block_m + 1) * BLOCK_M,
        SEQ, HEADS, DIM, DIM_V, SCALE, 2, True, BLOCK_N,
    )
    store_outputs(Y, LOG_NORMALISER, value_base, row_base, rows, row_max, row_sum, acc, SEQ, HEADS, DIM_V)


@triton.jit
def state_shares(L, LOG_NORMALISER, row_base, rows, SEQ, HEADS):
    """exp(L_i - log normaliser_i): how a unit of state numerator or norm weighs in y_i (0 for a row with no weight)."""
    return tl.exp(load_row(L, row_base, rows, SEQ, HEADS) - load_row(LOG_NORMALISER, row_base, rows, SEQ, HEADS))


def power_chunk_backward_queries(
    Q, K, V, L, L_LO, DY, DELTA, LOG_NORMALISER, S, Z, FIRST, SECOND, DQ, DL_ROWS,
    SEQ, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, CHUNK: tl.constexpr,
    FA: tl.constexpr, FB: tl.constexpr, N_A: tl.constexpr, N_B: tl.constexpr, PAIRS: tl.constexpr, SCALE: tl.constexpr, ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VALUE_BLOCK: tl.constexpr, VALUE_BLOCKS: tl.constexpr,
):
    """dq and the row part of dL for one query block: the intra-chunk part as in flash attention,
    plus the state part d phi(r q_i) = share_i (S_m dy_i - Delta_i z_m), which gives L_i
    phi(r q_i) . d phi(r q_i). (The row part is 0 in exact arithmetic; see power_attention_backward_queries.)"""
    block_m = tl.program_id(0)
    tile_base, value_base, row_base = head_bases(SEQ, HEADS, DIM, DIM_V)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = block_m * BLOCK_M // CHUNK
    q, dy = load_tile(Q, tile_base, rows, SEQ, HEADS, DIM), load_tile(DY, value_base, rows, SEQ, HEADS, DIM_V)
    delta, log_normaliser = load_row(DELTA, row_base, rows, SEQ, HEADS), load_row(LOG_NORMALISER, row_base, rows, SEQ, HEADS)
    gate_rows, gate_rows_lo = load_gates(L, L_LO, row_base, rows, SEQ, HEADS)
    dq, dl = accumulate_query_gradients(
        q, dy, delta, log_normaliser, gate_rows, gate_rows_lo, rows, tl.zeros([BLOCK_M, DIM], tl.float32), tl.zeros([BLOCK_M], tl.float32),
        K, V, L, L_LO, tile_base, value_base, row_base, chunk * CHUNK, (block_m + 1) * BLOCK_M, SEQ, HEADS, DIM, DIM_V, SCALE, 2, True, BLOCK_N,
    )

    share = state_shares(L, LOG_NORMALISER, row_base, rows, SEQ, HEADS)
    d_numerator = as_input(dy * share[:, None], DY)
    d_norm = -delta * share
    d_first_blocks, d_second_blocks = tl.zeros([BLOCK_M, N_A, FA], tl.float32), tl.zeros([BLOCK_M, N_B, FB], tl.float32)
    for pair in range(PAIRS):
        first, second, _ = pair_blocks(FIRST, SECOND, pair, FA, FB)
        q_first, q_second = query_blocks(Q, tile_base, rows, first, second, SEQ, HEADS, DIM, FA, FB, ROOT_SCALE)
        state, norm = load_state(S, Z, state_tile(chunk, pair, SEQ, HEADS, CHUNK, PAIRS), FA * FB, DIM_V)
        d_phi = tl.dot(d_numerator, tl.trans(as_input(state, DY))) + d_norm[:, None] * norm[None, :]
        dl += tl.sum(pair_features(q_first, q_second, BLOCK_M, FA, FB) * d_phi, axis=1)
        d_first_blocks, d_second_blocks = add_pair_gradient(
            d_first_blocks, d_second_blocks, d_phi, q_first, q_second, first, second, BLOCK_M, FA, FB, N_A, N_B
        )
    d_q_state = joined_gradient(d_first_blocks, d_second_blocks, BLOCK_M, DIM)
    store_tile(DQ, tile_base, rows, dq + d_q_state * ROOT_SCALE, SEQ, HEADS, DIM)
    store_row(DL_ROWS, row_base, rows, dl, SEQ, HEADS)


def power_state_scan_backward(
    Q, L, DY, DELTA, LOG_NORMALISER, S, Z, FIRST, SECOND, DS, DZ, D_END_GATE,
    SEQ, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, CHUNK: tl.constexpr,
    FA: tl.constexpr, FB: tl.constexpr, N_A: tl.constexpr, N_B: tl.constexpr, PAIRS: tl.constexpr, SCALE: tl.constexpr, ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VALUE_BLOCK: tl.constexpr, VALUE_BLOCKS: tl.constexpr,
):
    """The scan run backwards, for one pair of feature blocks and one block of value columns.
    With dS_m the gradient of the state entering chunk m: dS_m = exp(E_m) dS_{m+1} +
    sum_{i in m} phi(r q_i) share_i dy_i^T (the norm likewise with -share_i Delta_i),
    dS_{last + 1} = 0. Stores, per chunk, dS_{m+1} (the gradient of the chunk's own contribution)
    and this program's part of exp(E_m) <S_m, dS_{m+1}> (its end gate's; the norm's part in the
    first column block)."""
    pair, first, second, _, value_block = scan_program(FIRST, SECOND, FA, FB, VALUE_BLOCKS)
    tile_base, value_base, row_base = head_bases(SEQ, HEADS, DIM, DIM_V)
    d_state = tl.zeros([FA * FB, VALUE_BLOCK], tl.float32)
    d_norm = tl.zeros([FA * FB], tl.float32)
    chunks = tl.cdiv(SEQ, CHUNK)
    for step in range(chunks):
        chunk = chunks - 1 - step
        tile = state_tile(chunk, pair, SEQ, HEADS, CHUNK, PAIRS)
        store_state_columns(DS, DZ, tile, value_block, d_state, d_norm, FA * FB, DIM_V, VALUE_BLOCK)
        decay = tl.exp(chunk_end_gate(L, row_base, chunk, SEQ, HEADS, CHUNK))
        state = tl.load(S + state_offsets(tile, value_block, FA * FB, DIM_V, VALUE_BLOCK))
        through_norm = tl.where(value_block == 0, tl.sum(load_norm(Z, tile, FA * FB) * d_norm), 0.0)
        tl.store(D_END_GATE + tile * VALUE_BLOCKS + value_block, decay * (tl.sum(state * d_state) + through_norm))
        d_state = d_state * decay
        d_norm = d_norm * decay
        for start in range(chunk * CHUNK, (chunk + 1) * CHUNK, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q_first, q_second = query_blocks(Q, tile_base, rows, first, second, SEQ, HEADS, DIM, FA, FB, ROOT_SCALE)
            phi = pair_features(q_first, q_second, BLOCK_M, FA, FB)
            share = state_shares(L, LOG_NORMALISER, row_base, rows, SEQ, HEADS)
            dy = load_block(DY, value_base, rows, value_block, SEQ, HEADS, DIM_V, VALUE_BLOCK)
            d_state += tl.dot(tl.trans(as_input(phi, DY)), as_input(dy * share[:, None], DY))
            d_norm -= tl.sum(phi * (load_row(DELTA, row_base, rows, SEQ, HEADS) * share)[:, None], axis=0)


def power_chunk_backward_keys(
    Q, K, V, L, L_LO, DY, DELTA, LOG_NORMALISER, DS, DZ, FIRST, SECOND, DK, DV, DL, THROUGH_STATE,
    SEQ, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, CHUNK: tl.constexpr,
    FA: tl.constexpr, FB: tl.constexpr, N_A: tl.constexpr, N_B: tl.constexpr, PAIRS: tl.constexpr, SCALE: tl.constexpr, ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VALUE_BLOCK: tl.constexpr, VALUE_BLOCKS: tl.constexpr,
):
    """dk, dv and dL for one key block: from the chunk's queries as in flash attention, and from
    the key's share in the state after its chunk, c phi(x_j) v_j^T with x_j = r exp((E_m - L_j)/2) k_j.
    THROUGH_STATE_j = sum c phi(x_j) . (dS v_j + dz) is what that term gives dE_m; it takes as much from L_j."""
    block_n = tl.program_id(0)
    tile_base, value_base, row_base = head_bases(SEQ, HEADS, DIM, DIM_V)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = block_n * BLOCK_N // CHUNK
    k, v = load_tile(K, tile_base, cols, SEQ, HEADS, DIM), load_tile(V, value_base, cols, SEQ, HEADS, DIM_V)
    gate_cols, gate_cols_lo = load_gates(L, L_LO, row_base, cols, SEQ, HEADS)
    dk, dv, dl = accumulate_key_gradients(
        k, v, gate_cols, gate_cols_lo, cols, tl.zeros([BLOCK_N, DIM], tl.float32), tl.zeros([BLOCK_N, DIM_V], tl.float32),
        tl.zeros([BLOCK_N], tl.float32), Q, DY, DELTA, LOG_NORMALISER, L, L_LO, tile_base, value_base, row_base,
        (block_n * BLOCK_N // BLOCK_M) * BLOCK_M, tl.minimum((chunk + 1) * CHUNK, SEQ), SEQ, HEADS, DIM, DIM_V, SCALE, 2, True, BLOCK_M,
    )

    root_decay = key_root_decay(L, L_LO, row_base, cols, chunk, SEQ, HEADS, CHUNK, ROOT_SCALE)
    d_first_blocks, d_second_blocks = tl.zeros([BLOCK_N, N_A, FA], tl.float32), tl.zeros([BLOCK_N, N_B, FB], tl.float32)
    through_state = tl.zeros([BLOCK_N], tl.float32)
    for pair in range(PAIRS):
        first, second, weight = pair_blocks(FIRST, SECOND, pair, FA, FB)
        k_first = load_block(K, tile_base, cols, first, SEQ, HEADS, DIM, FA) * root_decay[:, None]
        k_second = load_block(K, tile_base, cols, second, SEQ, HEADS, DIM, FB) * root_decay[:, None]
        phi = pair_features(k_first, k_second, BLOCK_N, FA, FB) * weight
        d_state, d_norm = load_state(DS, DZ, state_tile(chunk, pair, SEQ, HEADS, CHUNK, PAIRS), FA * FB, DIM_V)
        dv += tl.dot(as_input(phi, V), d_state)
        d_phi = tl.dot(v, tl.trans(d_state)) + d_norm[None, :]
        through_state += tl.sum(phi * d_phi, axis=1)
        d_first_blocks, d_second_blocks = add_pair_gradient(
            d_first_blocks, d_second_blocks, d_phi * weight, k_first, k_second, first, second, BLOCK_N, FA, FB, N_A, N_B
        )
    d_k_state = joined_gradient(d_first_blocks, d_second_blocks, BLOCK_N, DIM)
    store_tile(DK, tile_base, cols, dk + d_k_state * root_decay[:, None], SEQ, HEADS, DIM)
    store_tile(DV, value_base, cols, dv, SEQ, HEADS, DIM_V)
    store_row(DL, row_base, cols, dl - through_state, SEQ, HEADS)
    store_row(THROUGH_STATE, row_base, cols, through_state, SEQ, HEADS)


@functools.cache
def pair_tables(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (A, B) of every feature tile, in the order of the state's pair axis: for each pair
    of FB-blocks P <= B, the quarters A of P (in units of FA dims)."""
    parts, blocks = SECOND_BLOCK // FIRST_BLOCK, dim // SECOND_BLOCK
    pairs = [(p * parts + part, b) for p in range(blocks) for b in range(p, blocks) for part in range(parts)]
    return np.array([a for a, _ in pairs], np.int32), np.array([b for _, b in pairs], np.int32)


def kernel_constants(
    seq: int, heads: int, dim: int, dim_v: int, scale: float, chunk_size: int, scan_value_columns: int = SCAN_VALUE_COLUMNS
) -> dict:
    """The scalars every chunked kernel takes (and the tile rows, from its tiling): SEQ at run
    time, the rest constexprs. The kernels count chunks from SEQ themselves."""
    value_block = min(dim_v, scan_value_columns)
    return dict(
        SEQ=seq, HEADS=heads, DIM=dim, DIM_V=dim_v, CHUNK=chunk_size,
        FA=FIRST_BLOCK, FB=SECOND_BLOCK, N_A=dim // FIRST_BLOCK, N_B=dim // SECOND_BLOCK, PAIRS=len(pair_tables(dim)[0]),
        SCALE=scale, ROOT_SCALE=math.sqrt(scale), VALUE_BLOCK=value_block, VALUE_BLOCKS=dim_v // value_block,
    )


def gpu_tilings(dim: int, itemsize: int) -> dict:
    """Each kernel's GPU tiling for q and k rows of dim elements of itemsize bytes: 64 rows and
    8 warps. The backward chunk kernels take 32 rows of keys a tile, 32 rows of queries too
    unless bf16 at dim <= 64, and 3 pipeline stages for bf16, 2 for float32. Compiled for sm_90
    at dims 16..128 as jax-triton compiles them (tests/test_triton.py), ptxas spills at most 28
    bytes a thread with these (triton 3.6, the keys kernel at dim 32; 8 with 3.7.1), none in the
    scans, the forward kernel and anything at dim 64 in bf16. In float32, 3 stages spilled 28
    bytes at dim 128 with triton 3.6 (2 stages: 8); in bf16, 3 stages spill as much (dim 32,
    triton 3.6; 2 stages: 4) but buffer one more tile ahead. Chosen to compile, not yet timed:
    ops.tune times them against larger tiles and other stages."""
    bf16 = itemsize == 2
    backward = Tiling(64 if bf16 and dim <= 64 else 32, 32, num_warps=8, num_stages=3 if bf16 else 2)
    return {
        power_state_scan: Tiling(64, 64, num_warps=8),
        power_chunk_forward: Tiling(64, 64, num_warps=8),
        power_chunk_backward_queries: backward,
        power_state_scan_backward: Tiling(64, 64, num_warps=8),
        power_chunk_backward_keys: backward,
    }


def chunk_multiple(q) -> int:
    """chunk_size must be a multiple of every tile's rows, so that no tile straddles two chunks."""
    return max(max(t.query_rows, t.key_rows) for t in tilings(gpu_tilings(q.shape[-1], q.dtype.itemsize)).values())


class Plan:
    """Shapes, tilings, grids and constants of the five kernels for one problem. A tuning sweep
    (ops.tune) may replace some kernels' tilings, here or in the interpreter, and the scans'
    value columns."""

    def __init__(self, q, v, scale: float, chunk_size: int, tiling_overrides=None, scan_value_columns: int = SCAN_VALUE_COLUMNS):
        batch, seq, heads, dim = q.shape
        self.constants = kernel_constants(seq, heads, dim, v.shape[-1], scale, chunk_size, scan_value_columns)
        pairs, features = self.constants["PAIRS"], FIRST_BLOCK * SECOND_BLOCK
        self.state = jax.ShapeDtypeStruct((batch, math.ceil(seq / chunk_size), heads, pairs, features, v.shape[-1]), jnp.float32)
        self.norm = jax.ShapeDtypeStruct(self.state.shape[:-1], jnp.float32)
        self.rows = jax.ShapeDtypeStruct((batch, seq, heads), jnp.float32)
        self.tables = [jnp.asarray(t) for t in pair_tables(dim)]
        self.tilings = tilings(gpu_tilings(dim, q.dtype.itemsize)) | (tiling_overrides or {})
        scan_grid = (pairs * self.constants["VALUE_BLOCKS"], batch * heads)
        self.grids = {
            power_state_scan: scan_grid,
            power_state_scan_backward: scan_grid,
            **{k: (math.ceil(seq / self.tilings[k].query_rows), batch * heads) for k in (power_chunk_forward, power_chunk_backward_queries)},
            power_chunk_backward_keys: (math.ceil(seq / self.tilings[power_chunk_backward_keys].key_rows), batch * heads),
        }

    def launch(self, kernel, inputs, out_shapes):
        return launch(kernel, self.grids[kernel], inputs, out_shapes, self.tilings[kernel], **self.constants)


def chunk_gates(log_g, chunk_size: int):
    """L: the cumulative gate restarted at each chunk, [batch, seq, heads], as a pair (hi, lo) of
    float32. Differences of L (intra-chunk weights, key decays to the chunk end) take both
    parts, as the flash kernels do; decays from the chunk's start, exp(E_m) and exp(L_i), take
    hi, as ops.sympow.chunk does."""
    L = exact_cumsum(split_chunks(log_g, chunk_size), axis=2)
    return tuple(part.reshape(log_g.shape[0], -1, log_g.shape[2])[:, : log_g.shape[1]] for part in L)


def chunked_forward(q, k, v, L, scale: float, chunk_size: int, **tuning):
    """(y, log normaliser, S, z) through the state scan and the chunk output kernel; L as (hi, lo).
    tuning: Plan's optional arguments."""
    plan = Plan(q, v, scale, chunk_size, **tuning)
    S, z = plan.launch(power_state_scan, [k, v, *L, *plan.tables], [plan.state, plan.norm])
    y, log_normaliser = plan.launch(power_chunk_forward, [q, k, v, *L, S, z, *plan.tables], [jax.ShapeDtypeStruct(v.shape, v.dtype), plan.rows])
    return y, log_normaliser, S, z


def chunked_backward(q, k, v, L, y, log_normaliser, S, z, dy, scale: float, chunk_size: int, d_log_normaliser=None, **tuning):
    """(dq, dk, dv, dL) through the three backward kernels; dL is the gradient of the chunk-local
    gates. d_log_normaliser: a gradient in the log-normaliser too (see `log_weight_delta`)."""
    plan = Plan(q, v, scale, chunk_size, **tuning)
    delta = log_weight_delta(dy, y, d_log_normaliser)
    rows = [q, k, v, *L, dy, delta, log_normaliser]
    dq, dL_rows = plan.launch(power_chunk_backward_queries, [*rows, S, z, *plan.tables], [jax.ShapeDtypeStruct(q.shape, q.dtype), plan.rows])
    # dS is only ever a matmul operand, so it is stored in the inputs' dtype: no extra rounding,
    # half the bytes the keys kernel reads for bf16. S stays float32 for its end gate's gradient.
    d_state, d_norm, d_end_gate = plan.launch(
        power_state_scan_backward, [q, L[0], dy, delta, log_normaliser, S, z, *plan.tables],
        [plan.state.update(dtype=v.dtype), plan.norm, jax.ShapeDtypeStruct((*plan.state.shape[:4], plan.constants["VALUE_BLOCKS"]), jnp.float32)],
    )
    dk, dv, dL_columns, through_state = plan.launch(
        power_chunk_backward_keys, [*rows, d_state, d_norm, *plan.tables],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype), plan.rows, plan.rows],
    )
    # E_m is L at chunk m's last position: it collects the scan's part and the keys' parts.
    d_end = jnp.sum(d_end_gate, axis=(3, 4)) + jnp.sum(split_chunks(through_state, chunk_size), axis=2)  # [batch, chunks, heads]
    dL = split_chunks(dL_rows + dL_columns, chunk_size).at[:, :, -1].add(d_end)
    return dq, dk, dv, dL


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def triton_chunked(q, k, v, log_g, scale: float, chunk_size: int):
    """Gated power attention with p = 2 through the chunked Triton kernels: y and the log of its
    normaliser (log sum_j w_ij), differentiable in q, k, v and log_g."""
    y, log_normaliser, *_ = chunked_forward(q, k, v, chunk_gates(log_g, chunk_size), scale, chunk_size)
    return y, log_normaliser


def triton_chunked_forward(q, k, v, log_g, scale, chunk_size):
    L = chunk_gates(log_g, chunk_size)
    y, log_normaliser, S, z = chunked_forward(q, k, v, L, scale, chunk_size)
    return (y, log_normaliser), (q, k, v, L, y, log_normaliser, S, z)


def triton_chunked_backward(scale, chunk_size, residuals, cotangents):
    dy, d_log_normaliser = cotangents
    dq, dk, dv, dL = chunked_backward(*residuals, dy, scale, chunk_size, d_log_normaliser)
    # L_t sums log_g over its chunk up to t, so d log_g_u = sum over t >= u in u's chunk of dL_t.
    d_log_g = jnp.flip(jnp.cumsum(jnp.flip(dL, axis=2), axis=2), axis=2)
    seq = dq.shape[1]
    return dq, dk, dv, d_log_g.reshape(dq.shape[0], -1, dq.shape[2])[:, :seq].astype(residuals[3][0].dtype)


triton_chunked.defvjp(triton_chunked_forward, triton_chunked_backward)


def chunked(q, k, v, log_g, scale: float, chunk_size: int):
    """Gated power attention with p = 2 through the chunked kernels (O(T c d + T D' d) work, states
    per chunk): (y, log normaliser)."""
    check_dims(q, v)
    multiple = chunk_multiple(q)
    if chunk_size % multiple:
        raise ValueError(f"impl='triton' needs chunk_size a multiple of {multiple} here (tiles do not straddle chunks); got {chunk_size}")
    log_g = jnp.zeros(q.shape[:3], jnp.float32) if log_g is None else log_g.astype(jnp.float32)
    return triton_chunked(q, k, v, log_g, scale, chunk_size)
