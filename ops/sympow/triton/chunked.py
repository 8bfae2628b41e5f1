"""The chunked path for p = 2 in Triton: the state scan, the state query fused with the
intra-chunk attention and the normalisation, and their backward kernels.

The state uses a tiled layout of phi_2. The head dim splits into blocks of F = FEATURE_BLOCK
dims; for each pair of blocks A <= B the feature tile is vec(x_A outer x_B) (F^2 features),
weighted c_AB = 1 on the diagonal and 2 off it, so that
    sum_{A <= B} c_AB vec(x_A x_B^T) . vec(y_A y_B^T) = (x . y)^2.
That is D' = n(n + 1)/2 F^2 features for n = dim / F (2560 at dim 64, F 16, against the exact
2080): a little redundancy on the diagonal tiles buys dense F^2-row matmuls, and the features
are made in registers from rows of q or k, so phi(Q) and phi(K) never go to memory.

Per batch x head, with L the chunk-local cumulative gate and E_m the last L of chunk m
(as in ops.sympow.chunk):
    S_0 = 0,  S_{m+1} = exp(E_m) S_m + sum_{j in m} c phi(exp((E_m - L_j)/2) r k_j) v_j^T   (z likewise, with 1)
    y_i = [exp(L_i) phi(r q_i)^T S_m + sum_{j in m, j <= i} w_ij v_j] / [the same with z and 1]
with r = sqrt(scale) and w_ij the gated power weights inside the chunk, evaluated in log
space by the flash-attention helpers. The states stay in float32 (TF32 matmuls on a GPU).

Kernels:
    power_state_scan           (pair, batch x head): S_m for every chunk, one chunk after another.
    power_chunk_forward        (query block, batch x head): y and the log-normaliser.
    power_chunk_backward_queries  (query block, batch x head): dq and the row part of dL.
    power_state_scan_backward  (pair, batch x head): the gradient of each chunk's state
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

from ops.sympow.chunk import chunk_local_gates, split_chunks
from ops.sympow.triton.attention import (
    accumulate_key_gradients,
    accumulate_keys,
    accumulate_query_gradients,
    head_bases,
    load_block,
    load_row,
    load_tile,
    store_outputs,
    store_row,
    store_tile,
)
from ops.sympow.triton.launch import block_rows, launch

FEATURE_BLOCK = 16  # the smallest width tl.dot takes
# At head dim 128 a [F^2, dim] float32 state tile and its matmul operands overflow an H100's
# 227 KiB of shared memory per block (measured by the sm_90 compiles); such heads use the flash kernels.
CHUNKED_DIMS = (16, 32, 64)


# States are [batch, chunks, heads, pairs, F^2, dim_v] and norms [batch, chunks, heads, pairs, F^2];
# the tables FIRST and SECOND give the blocks (A, B) of each pair.
@triton.jit
def state_tile(chunk, pair, HEADS, CHUNKS, PAIRS):
    """Index of this program's (batch, chunk, head, pair) in the [batch, chunks, heads, pairs] grid
    of tiles, in int64: times the F^2 x dim elements of a tile it can pass 2^31."""
    batch_head = tl.program_id(1).to(tl.int64)
    batch, head = batch_head // HEADS, batch_head % HEADS
    return ((batch * CHUNKS + chunk) * HEADS + head) * PAIRS + pair


@triton.jit
def load_state(S, Z, tile, FEATURES, DIM_V):
    features = tl.arange(0, FEATURES)
    state = tl.load(S + tile * FEATURES * DIM_V + features[:, None] * DIM_V + tl.arange(0, DIM_V)[None, :])
    return state, tl.load(Z + tile * FEATURES + features)


@triton.jit
def store_state(S, Z, tile, state, norm, FEATURES, DIM_V):
    features = tl.arange(0, FEATURES)
    tl.store(S + tile * FEATURES * DIM_V + features[:, None] * DIM_V + tl.arange(0, DIM_V)[None, :], state)
    tl.store(Z + tile * FEATURES + features, norm)


@triton.jit
def pair_features(x_first, x_second, ROWS, F):
    """vec(x_A outer x_B) for each row: [ROWS, F^2]."""
    return tl.reshape(x_first[:, :, None] * x_second[:, None, :], (ROWS, F * F))


@triton.jit
def pair_feature_gradient(d_features, x_first, x_second, first, second, ROWS, F, N_BLOCKS):
    """The gradient of sum(d_features * vec(x_A outer x_B)) in x, as [ROWS, N_BLOCKS, F]: only
    blocks A and B are non-zero (both halves land on one block when A == B)."""
    d_outer = tl.reshape(d_features, (ROWS, F, F))
    d_first = tl.sum(d_outer * x_second[:, None, :], axis=2)
    d_second = tl.sum(d_outer * x_first[:, :, None], axis=1)
    blocks = tl.arange(0, N_BLOCKS)[None, :, None]
    return tl.where(blocks == first, d_first[:, None, :], 0.0) + tl.where(blocks == second, d_second[:, None, :], 0.0)


@triton.jit
def pair_blocks(FIRST, SECOND, pair):
    """Blocks (A, B) of a pair and its weight c_AB."""
    first, second = tl.load(FIRST + pair), tl.load(SECOND + pair)
    return first, second, tl.where(first == second, 1.0, 2.0)


@triton.jit
def chunk_end_gate(L, row_base, chunk, SEQ, HEADS, CHUNK):
    """E_m: L at the last position of chunk m (the last real one, for a partial chunk)."""
    return tl.load(L + row_base + (tl.minimum((chunk + 1) * CHUNK, SEQ) - 1) * HEADS)


@triton.jit
def key_root_decay(L, row_base, cols, end_gate, SEQ, HEADS, ROOT_SCALE):
    """r exp((E_m - L_j) / 2), which makes phi of the scaled key carry the decay exp(E_m - L_j)."""
    return tl.exp((end_gate - load_row(L, row_base, cols, SEQ, HEADS)) * 0.5) * ROOT_SCALE


def power_state_scan(
    K, V, L, FIRST, SECOND, S, Z,
    SEQ: tl.constexpr, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
    F: tl.constexpr, N_BLOCKS: tl.constexpr, PAIRS: tl.constexpr, SCALE: tl.constexpr, ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The state entering every chunk, for one pair of feature blocks; the running state stays in registers."""
    pair = tl.program_id(0)
    tile_base, value_base, row_base = head_bases(SEQ, HEADS, DIM, DIM_V)
    first, second, weight = pair_blocks(FIRST, SECOND, pair)
    state = tl.zeros([F * F, DIM_V], tl.float32)
    norm = tl.zeros([F * F], tl.float32)
    for chunk in range(CHUNKS):
        store_state(S, Z, state_tile(chunk, pair, HEADS, CHUNKS, PAIRS), state, norm, F * F, DIM_V)
        end_gate = chunk_end_gate(L, row_base, chunk, SEQ, HEADS, CHUNK)
        state = state * tl.exp(end_gate)
        norm = norm * tl.exp(end_gate)
        for start in range(chunk * CHUNK, (chunk + 1) * CHUNK, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            root_decay = key_root_decay(L, row_base, cols, end_gate, SEQ, HEADS, ROOT_SCALE)[:, None]
            k_first = load_block(K, tile_base, cols, first, SEQ, HEADS, DIM, F) * root_decay
            k_second = load_block(K, tile_base, cols, second, SEQ, HEADS, DIM, F) * root_decay
            phi = pair_features(k_first, k_second, BLOCK_N, F) * weight
            state += tl.dot(tl.trans(phi), load_tile(V, value_base, cols, SEQ, HEADS, DIM_V).to(tl.float32))
            norm += tl.sum(phi, axis=0)


@triton.jit
def query_blocks(Q, tile_base, rows, first, second, SEQ, HEADS, DIM, F, ROOT_SCALE):
    """Blocks A and B of r q for these rows, in float32."""
    q_first = load_block(Q, tile_base, rows, first, SEQ, HEADS, DIM, F).to(tl.float32) * ROOT_SCALE
    q_second = load_block(Q, tile_base, rows, second, SEQ, HEADS, DIM, F).to(tl.float32) * ROOT_SCALE
    return q_first, q_second


def power_chunk_forward(
    Q, K, V, L, S, Z, FIRST, SECOND, Y, LOG_NORMALISER,
    SEQ: tl.constexpr, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
    F: tl.constexpr, N_BLOCKS: tl.constexpr, PAIRS: tl.constexpr, SCALE: tl.constexpr, ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y for one query block: the state entering its chunk, queried, is the first term of the
    running row max and sums; the chunk's keys up to the diagonal follow as in flash attention."""
    block_m = tl.program_id(0)
    tile_base, value_base, row_base = head_bases(SEQ, HEADS, DIM, DIM_V)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = block_m * BLOCK_M // CHUNK
    gate_rows = load_row(L, row_base, rows, SEQ, HEADS)

    numerator = tl.zeros([BLOCK_M, DIM_V], tl.float32)
    denominator = tl.zeros([BLOCK_M], tl.float32)
    for pair in range(PAIRS):
        first, second, _ = pair_blocks(FIRST, SECOND, pair)
        q_first, q_second = query_blocks(Q, tile_base, rows, first, second, SEQ, HEADS, DIM, F, ROOT_SCALE)
        phi = pair_features(q_first, q_second, BLOCK_M, F)
        state, norm = load_state(S, Z, state_tile(chunk, pair, HEADS, CHUNKS, PAIRS), F * F, DIM_V)
        numerator += tl.dot(phi, state)
        denominator += tl.sum(phi * norm[None, :], axis=1)

    # In the frame of the state's own log weight L_i + log(phi^T z) its weight sum is 1. A
    # state weight that is not positive (no past keys, or round-off around 0) counts as none.
    has_state = denominator > 0
    row_max = tl.where(has_state, gate_rows + tl.log(tl.where(has_state, denominator, 1.0)), float("-inf"))
    row_sum = tl.where(has_state, 1.0, 0.0)
    acc = tl.where(has_state[:, None], numerator / tl.where(has_state, denominator, 1.0)[:, None], 0.0)
    q = load_tile(Q, tile_base, rows, SEQ, HEADS, DIM)
    row_max, row_sum, acc = accumulate_keys(
        q, gate_rows, rows, row_max, row_sum, acc, K, V, L, tile_base, value_base, row_base, chunk * CHUNK, (block_m + 1) * BLOCK_M,
        SEQ, HEADS, DIM, DIM_V, SCALE, 2, True, BLOCK_N,
    )
    store_outputs(Y, LOG_NORMALISER, value_base, row_base, rows, row_max, row_sum, acc, SEQ, HEADS, DIM_V)


@triton.jit
def state_shares(L, LOG_NORMALISER, row_base, rows, SEQ, HEADS):
    """exp(L_i - log normaliser_i): how a unit of state numerator or norm weighs in y_i (0 for a row with no weight)."""
    return tl.exp(load_row(L, row_base, rows, SEQ, HEADS) - load_row(LOG_NORMALISER, row_base, rows, SEQ, HEADS))


def power_chunk_backward_queries(
    Q, K, V, L, DY, DELTA, LOG_NORMALISER, S, Z, FIRST, SECOND, DQ, DL_ROWS,
    SEQ: tl.constexpr, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
    F: tl.constexpr, N_BLOCKS: tl.constexpr, PAIRS: tl.constexpr, SCALE: tl.constexpr, ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    gate_rows = load_row(L, row_base, rows, SEQ, HEADS)
    dq, dl = accumulate_query_gradients(
        q, dy, delta, log_normaliser, gate_rows, rows, tl.zeros([BLOCK_M, DIM], tl.float32), tl.zeros([BLOCK_M], tl.float32),
        K, V, L, tile_base, value_base, row_base, chunk * CHUNK, (block_m + 1) * BLOCK_M, SEQ, HEADS, DIM, DIM_V, SCALE, 2, True, BLOCK_N,
    )

    share = state_shares(L, LOG_NORMALISER, row_base, rows, SEQ, HEADS)
    d_numerator = dy.to(tl.float32) * share[:, None]
    d_norm = -delta * share
    d_blocks = tl.zeros([BLOCK_M, N_BLOCKS, F], tl.float32)
    for pair in range(PAIRS):
        first, second, _ = pair_blocks(FIRST, SECOND, pair)
        q_first, q_second = query_blocks(Q, tile_base, rows, first, second, SEQ, HEADS, DIM, F, ROOT_SCALE)
        state, norm = load_state(S, Z, state_tile(chunk, pair, HEADS, CHUNKS, PAIRS), F * F, DIM_V)
        d_phi = tl.dot(d_numerator, tl.trans(state)) + d_norm[:, None] * norm[None, :]
        dl += tl.sum(pair_features(q_first, q_second, BLOCK_M, F) * d_phi, axis=1)
        d_blocks += pair_feature_gradient(d_phi, q_first, q_second, first, second, BLOCK_M, F, N_BLOCKS)
    store_tile(DQ, tile_base, rows, dq + tl.reshape(d_blocks, (BLOCK_M, DIM)) * ROOT_SCALE, SEQ, HEADS, DIM)
    store_row(DL_ROWS, row_base, rows, dl, SEQ, HEADS)


def power_state_scan_backward(
    Q, L, DY, DELTA, LOG_NORMALISER, S, Z, FIRST, SECOND, DS, DZ, D_END_GATE,
    SEQ: tl.constexpr, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
    F: tl.constexpr, N_BLOCKS: tl.constexpr, PAIRS: tl.constexpr, SCALE: tl.constexpr, ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The scan run backwards, for one pair of feature blocks. With dS_m the gradient of the
    state entering chunk m: dS_m = exp(E_m) dS_{m+1} + sum_{i in m} phi(r q_i) share_i dy_i^T
    (the norm likewise with -share_i Delta_i), dS_{last + 1} = 0. Stores, per chunk, dS_{m+1}
    (the gradient of the chunk's own contribution) and exp(E_m) <S_m, dS_{m+1}> (its end gate's)."""
    pair = tl.program_id(0)
    tile_base, value_base, row_base = head_bases(SEQ, HEADS, DIM, DIM_V)
    first, second, _ = pair_blocks(FIRST, SECOND, pair)
    d_state = tl.zeros([F * F, DIM_V], tl.float32)
    d_norm = tl.zeros([F * F], tl.float32)
    for step in range(CHUNKS):
        chunk = CHUNKS - 1 - step
        tile = state_tile(chunk, pair, HEADS, CHUNKS, PAIRS)
        store_state(DS, DZ, tile, d_state, d_norm, F * F, DIM_V)
        decay = tl.exp(chunk_end_gate(L, row_base, chunk, SEQ, HEADS, CHUNK))
        state, norm = load_state(S, Z, tile, F * F, DIM_V)
        tl.store(D_END_GATE + tile, decay * (tl.sum(state * d_state) + tl.sum(norm * d_norm)))
        d_state = d_state * decay
        d_norm = d_norm * decay
        for start in range(chunk * CHUNK, (chunk + 1) * CHUNK, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q_first, q_second = query_blocks(Q, tile_base, rows, first, second, SEQ, HEADS, DIM, F, ROOT_SCALE)
            phi = pair_features(q_first, q_second, BLOCK_M, F)
            share = state_shares(L, LOG_NORMALISER, row_base, rows, SEQ, HEADS)
            dy = load_tile(DY, value_base, rows, SEQ, HEADS, DIM_V).to(tl.float32)
            d_state += tl.dot(tl.trans(phi), dy * share[:, None])
            d_norm -= tl.sum(phi * (load_row(DELTA, row_base, rows, SEQ, HEADS) * share)[:, None], axis=0)


def power_chunk_backward_keys(
    Q, K, V, L, DY, DELTA, LOG_NORMALISER, DS, DZ, FIRST, SECOND, DK, DV, DL, THROUGH_STATE,
    SEQ: tl.constexpr, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
    F: tl.constexpr, N_BLOCKS: tl.constexpr, PAIRS: tl.constexpr, SCALE: tl.constexpr, ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv and dL for one key block: from the chunk's queries as in flash attention, and from
    the key's share in the state after its chunk, c phi(x_j) v_j^T with x_j = r exp((E_m - L_j)/2) k_j.
    THROUGH_STATE_j = sum c phi(x_j) . (dS v_j + dz) is what that term gives dE_m; it takes as much from L_j."""
    block_n = tl.program_id(0)
    tile_base, value_base, row_base = head_bases(SEQ, HEADS, DIM, DIM_V)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = block_n * BLOCK_N // CHUNK
    k, v = load_tile(K, tile_base, cols, SEQ, HEADS, DIM), load_tile(V, value_base, cols, SEQ, HEADS, DIM_V)
    gate_cols = load_row(L, row_base, cols, SEQ, HEADS)
    dk, dv, dl = accumulate_key_gradients(
        k, v, gate_cols, cols, tl.zeros([BLOCK_N, DIM], tl.float32), tl.zeros([BLOCK_N, DIM_V], tl.float32),
        tl.zeros([BLOCK_N], tl.float32), Q, DY, DELTA, LOG_NORMALISER, L, tile_base, value_base, row_base,
        (block_n * BLOCK_N // BLOCK_M) * BLOCK_M, tl.minimum((chunk + 1) * CHUNK, SEQ), SEQ, HEADS, DIM, DIM_V, SCALE, 2, True, BLOCK_M,
    )

    root_decay = key_root_decay(L, row_base, cols, chunk_end_gate(L, row_base, chunk, SEQ, HEADS, CHUNK), SEQ, HEADS, ROOT_SCALE)
    v = v.to(tl.float32)
    d_blocks = tl.zeros([BLOCK_N, N_BLOCKS, F], tl.float32)
    through_state = tl.zeros([BLOCK_N], tl.float32)
    for pair in range(PAIRS):
        first, second, weight = pair_blocks(FIRST, SECOND, pair)
        k_first = load_block(K, tile_base, cols, first, SEQ, HEADS, DIM, F) * root_decay[:, None]
        k_second = load_block(K, tile_base, cols, second, SEQ, HEADS, DIM, F) * root_decay[:, None]
        phi = pair_features(k_first, k_second, BLOCK_N, F) * weight
        d_state, d_norm = load_state(DS, DZ, state_tile(chunk, pair, HEADS, CHUNKS, PAIRS), F * F, DIM_V)
        dv += tl.dot(phi, d_state)
        d_phi = tl.dot(v, tl.trans(d_state)) + d_norm[None, :]
        through_state += tl.sum(phi * d_phi, axis=1)
        d_blocks += pair_feature_gradient(d_phi * weight, k_first, k_second, first, second, BLOCK_N, F, N_BLOCKS)
    store_tile(DK, tile_base, cols, dk + tl.reshape(d_blocks, (BLOCK_N, DIM)) * root_decay[:, None], SEQ, HEADS, DIM)
    store_tile(DV, value_base, cols, dv, SEQ, HEADS, DIM_V)
    store_row(DL, row_base, cols, dl - through_state, SEQ, HEADS)
    store_row(THROUGH_STATE, row_base, cols, through_state, SEQ, HEADS)


@functools.cache
def pair_tables(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks (A, B), A <= B, of every feature pair, in the order of the state's pair axis."""
    blocks = dim // FEATURE_BLOCK
    pairs = [(a, b) for a in range(blocks) for b in range(a, blocks)]
    return np.array([a for a, _ in pairs], np.int32), np.array([b for _, b in pairs], np.int32)


def kernel_constants(seq: int, heads: int, dim: int, dim_v: int, scale: float, chunk_size: int, block: int) -> dict:
    """The constants every chunked kernel takes."""
    blocks = dim // FEATURE_BLOCK
    return dict(
        SEQ=seq, HEADS=heads, DIM=dim, DIM_V=dim_v, CHUNK=chunk_size, CHUNKS=math.ceil(seq / chunk_size), F=FEATURE_BLOCK,
        N_BLOCKS=blocks, PAIRS=blocks * (blocks + 1) // 2, SCALE=scale, ROOT_SCALE=math.sqrt(scale), BLOCK_M=block, BLOCK_N=block,
    )


class Plan:
    """Shapes, grids and constants shared by the five kernels for one problem."""

    def __init__(self, q, v, scale: float, chunk_size: int):
        batch, seq, heads, dim = q.shape
        block = block_rows()
        self.constants = kernel_constants(seq, heads, dim, v.shape[-1], scale, chunk_size, block)
        pairs, features = self.constants["PAIRS"], FEATURE_BLOCK**2
        self.state = jax.ShapeDtypeStruct((batch, self.constants["CHUNKS"], heads, pairs, features, v.shape[-1]), jnp.float32)
        self.norm = jax.ShapeDtypeStruct(self.state.shape[:-1], jnp.float32)
        self.rows = jax.ShapeDtypeStruct((batch, seq, heads), jnp.float32)
        self.pair_grid = (pairs, batch * heads)
        self.block_grid = (math.ceil(seq / block), batch * heads)
        self.tables = [jnp.asarray(t) for t in pair_tables(dim)]


def chunk_gates(log_g, chunk_size: int):
    """L: the cumulative gate restarted at each chunk, [batch, seq, heads]."""
    L = chunk_local_gates(split_chunks(log_g, chunk_size))
    return L.reshape(log_g.shape[0], -1, log_g.shape[2])[:, : log_g.shape[1]]


def chunked_forward(q, k, v, L, scale: float, chunk_size: int):
    """(y, log normaliser, S, z) through the state scan and the chunk output kernel."""
    plan = Plan(q, v, scale, chunk_size)
    S, z = launch(power_state_scan, plan.pair_grid, [k, v, L, *plan.tables], [plan.state, plan.norm], **plan.constants)
    y, log_normaliser = launch(
        power_chunk_forward, plan.block_grid, [q, k, v, L, S, z, *plan.tables],
        [jax.ShapeDtypeStruct(v.shape, v.dtype), plan.rows], **plan.constants,
    )
    return y, log_normaliser, S, z


def chunked_backward(q, k, v, L, y, log_normaliser, S, z, dy, scale: float, chunk_size: int):
    """(dq, dk, dv, dL) through the three backward kernels; dL is the gradient of the chunk-local gates."""
    plan = Plan(q, v, scale, chunk_size)
    delta = jnp.sum(dy.astype(jnp.float32) * y.astype(jnp.float32), axis=-1)
    rows = [q, k, v, L, dy, delta, log_normaliser]
    dq, dL_rows = launch(
        power_chunk_backward_queries, plan.block_grid, [*rows, S, z, *plan.tables], [jax.ShapeDtypeStruct(q.shape, q.dtype), plan.rows], **plan.constants
    )
    d_state, d_norm, d_end_gate = launch(
        power_state_scan_backward, plan.pair_grid, [q, L, dy, delta, log_normaliser, S, z, *plan.tables],
        [plan.state, plan.norm, jax.ShapeDtypeStruct(plan.state.shape[:4], jnp.float32)], **plan.constants,
    )
    dk, dv, dL_columns, through_state = launch(
        power_chunk_backward_keys, plan.block_grid, [*rows, d_state, d_norm, *plan.tables],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype), plan.rows, plan.rows], **plan.constants,
    )
    # E_m is L at chunk m's last position: it collects the scan's part and the keys' parts.
    d_end = jnp.sum(d_end_gate, axis=3) + jnp.sum(split_chunks(through_state, chunk_size), axis=2)  # [batch, chunks, heads]
    dL = split_chunks(dL_rows + dL_columns, chunk_size).at[:, :, -1].add(d_end)
    return dq, dk, dv, dL


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def triton_chunked(q, k, v, log_g, scale: float, chunk_size: int):
    """Gated power attention with p = 2 through the chunked Triton kernels, differentiable in q, k, v and log_g."""
    y, *_ = chunked_forward(q, k, v, chunk_gates(log_g, chunk_size), scale, chunk_size)
    return y


def triton_chunked_forward(q, k, v, log_g, scale, chunk_size):
    L = chunk_gates(log_g, chunk_size)
    y, log_normaliser, S, z = chunked_forward(q, k, v, L, scale, chunk_size)
    return y, (q, k, v, L, y, log_normaliser, S, z)


def triton_chunked_backward(scale, chunk_size, residuals, dy):
    dq, dk, dv, dL = chunked_backward(*residuals, dy, scale, chunk_size)
    # L_t sums log_g over its chunk up to t, so d log_g_u = sum over t >= u in u's chunk of dL_t.
    d_log_g = jnp.flip(jnp.cumsum(jnp.flip(dL, axis=2), axis=2), axis=2)
    seq = dq.shape[1]
    return dq, dk, dv, d_log_g.reshape(dq.shape[0], -1, dq.shape[2])[:, :seq].astype(residuals[3].dtype)


triton_chunked.defvjp(triton_chunked_forward, triton_chunked_backward)


def chunked(q, k, v, log_g, scale: float, chunk_size: int):
    """Gated power attention with p = 2 through the chunked kernels (O(T c d + T D' d) work, states per chunk)."""
    if q.shape[-1] not in CHUNKED_DIMS or v.shape[-1] not in CHUNKED_DIMS:
        raise ValueError(f"the chunked Triton kernels need head dims of q, k and of v in {CHUNKED_DIMS}; got {q.shape[-1]} and {v.shape[-1]}")
    if chunk_size % block_rows():
        raise ValueError(f"impl='triton' needs chunk_size a multiple of {block_rows()} here (tiles do not straddle chunks); got {chunk_size}")
    log_g = jnp.zeros(q.shape[:3], jnp.float32) if log_g is None else log_g.astype(jnp.float32)
    return triton_chunked(q, k, v, log_g, scale, chunk_size)
