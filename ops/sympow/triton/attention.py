"""Flash-style gated power attention in log space: the whole op for short sequences and
for states too large to hold (p = 4 at d = 64).

Per (query block, batch x head) program, over key blocks up to the diagonal:
log w_ij = p log|s q_i . k_j| + G_i - G_j (j <= i), with G given as hi + lo in float32 pairs
(ops.exact) so that G_i - G_j keeps float32's relative precision when |G| is large (strong
gates over long sequences: |G| ~ 3000 at T = 500, gamma = 0.01), kept against a running row max m_i
as flash attention keeps softmax scores; y_i = sum_j w_ij v_j / max(sum_j w_ij, eps) in the
frame of the final row max. The log-normaliser m_i + log l_i is stored for the backward pass."""

import functools
import math

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from ops.exact import exact_cumsum
from ops.sympow.triton.launch import Tiling, launch, tilings

EPS = tl.constexpr(1e-6)  # as ops.sympow.naive.EPS; a kernel reads only constexpr globals


# q, k and their gradients are [batch, seq, heads, dim]; v, y and theirs [batch, seq, heads, dim_v];
# G and the per-row statistics [batch, seq, heads]; all contiguous. Program axis 1 runs over batch x heads.
@triton.jit
def head_bases(SEQ, HEADS, DIM, DIM_V):
    """Offsets of this program's (batch, head) in a [batch, seq, heads, dim] array (q, k), a
    [batch, seq, heads, dim_v] array (v, y) and a [batch, seq, heads] array (gates, row statistics),
    in int64: a whole batch may pass 2^31 elements (offsets within one batch entry stay int32)."""
    batch_head = tl.program_id(1).to(tl.int64)
    batch, head = batch_head // HEADS, batch_head % HEADS
    return batch * SEQ * HEADS * DIM + head * DIM, batch * SEQ * HEADS * DIM_V + head * DIM_V, batch * SEQ * HEADS + head


@triton.jit
def load_block(X, base, positions, block, SEQ, HEADS, DIM, WIDTH):
    """Rows `positions`, columns block * WIDTH .. (block + 1) * WIDTH of this head's [seq, dim] slice; zeros past SEQ."""
    dims = block * WIDTH + tl.arange(0, WIDTH)
    return tl.load(X + base + positions[:, None] * (HEADS * DIM) + dims[None, :], mask=(positions < SEQ)[:, None], other=0.0)


@triton.jit
def load_tile(X, base, positions, SEQ, HEADS, DIM):
    """Rows `positions` of this head's [seq, dim] slice; zeros past SEQ."""
    return load_block(X, base, positions, 0, SEQ, HEADS, DIM, DIM)


@triton.jit
def store_tile(X, base, positions, tile, SEQ, HEADS, DIM):
    dims = tl.arange(0, DIM)
    tl.store(X + base + positions[:, None] * (HEADS * DIM) + dims[None, :], tile, mask=(positions < SEQ)[:, None])


@triton.jit
def load_row(X, base, positions, SEQ, HEADS):
    """Entries `positions` of this head's [seq] slice; zeros past SEQ."""
    return tl.load(X + base + positions * HEADS, mask=positions < SEQ, other=0.0)


@triton.jit
def store_row(X, base, positions, row, SEQ, HEADS):
    tl.store(X + base + positions * HEADS, row, mask=positions < SEQ)


@triton.jit
def load_gates(G, G_LO, row_base, positions, SEQ, HEADS):
    """hi and lo of the cumulative gate at `positions` of this head."""
    return load_row(G, row_base, positions, SEQ, HEADS), load_row(G_LO, row_base, positions, SEQ, HEADS)


@triton.jit
def gate_differences(rows_hi, rows_lo, cols_hi, cols_lo):
    """G_i - G_j on a tile: the hi parts subtract with one rounding, relative to the difference."""
    return (rows_hi[:, None] - cols_hi[None, :]) + (rows_lo[:, None] - cols_lo[None, :])


@triton.jit
def accumulate_keys(
    q, gate_rows, gate_rows_lo, rows, row_max, row_sum, acc, K, V, G, G_LO, tile_base, value_base, row_base, key_start, key_end,
    SEQ, HEADS, DIM, DIM_V, SCALE, POWER, GATED, BLOCK_N,
):
    """Fold keys key_start..key_end (block-aligned, causal mask applied) into a row's running
    max, weight sum and weighted sum of values, rescaling to the new max as flash attention does."""
    for start in range(key_start, key_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k, v = load_tile(K, tile_base, cols, SEQ, HEADS, DIM), load_tile(V, value_base, cols, SEQ, HEADS, DIM_V)
        gate_cols, gate_cols_lo = load_gates(G, G_LO, row_base, cols, SEQ, HEADS)
        gates = gate_differences(gate_rows, gate_rows_lo, gate_cols, gate_cols_lo)
        log_w, _ = gated_log_weights(q, k, gates, rows, cols, SEQ, SCALE, POWER, GATED)

        new_max = tl.maximum(row_max, tl.max(log_w, axis=1))
        frame = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with no weight yet stays at 0
        w = tl.exp(log_w - frame[:, None])
        rescale = tl.exp(row_max - frame)
        row_sum = row_sum * rescale + tl.sum(w, axis=1)
        acc = acc * rescale[:, None] + tl.dot(w.to(v.dtype), v)
        row_max = new_max
    return row_max, row_sum, acc


@triton.jit
def store_outputs(Y, LOG_NORMALISER, value_base, row_base, rows, row_max, row_sum, acc, SEQ, HEADS, DIM_V):
    """y = acc / max(row sum, eps), and the log-normaliser, +inf for a row with no weight so
    that the backward pass gives it probabilities exp(-inf) = 0 rather than NaN."""
    store_tile(Y, value_base, rows, acc / tl.maximum(row_sum, EPS)[:, None], SEQ, HEADS, DIM_V)
    log_normaliser = tl.where(row_sum > 0, row_max + tl.log(row_sum), float("inf"))
    store_row(LOG_NORMALISER, row_base, rows, log_normaliser, SEQ, HEADS)


def power_attention_forward(
    Q, K, V, G, G_LO, Y, LOG_NORMALISER,
    SEQ, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, SCALE: tl.constexpr, POWER: tl.constexpr,
    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block_m = tl.program_id(0)
    tile_base, value_base, row_base = head_bases(SEQ, HEADS, DIM, DIM_V)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_tile(Q, tile_base, rows, SEQ, HEADS, DIM)
    gate_rows, gate_rows_lo = load_gates(G, G_LO, row_base, rows, SEQ, HEADS)
    row_max, row_sum, acc = accumulate_keys(
        q, gate_rows, gate_rows_lo, rows, tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
        tl.zeros([BLOCK_M, DIM_V], tl.float32), K, V, G, G_LO, tile_base, value_base, row_base, 0, (block_m + 1) * BLOCK_M,
        SEQ, HEADS, DIM, DIM_V, SCALE, POWER, GATED, BLOCK_N,
    )
    store_outputs(Y, LOG_NORMALISER, value_base, row_base, rows, row_max, row_sum, acc, SEQ, HEADS, DIM_V)


@triton.jit
def gated_log_weights(q, k, gates, rows, cols, SEQ, SCALE, POWER, GATED):
    """log w = p log|s q . k| + G_i - G_j on a tile (gates: G_i - G_j), -inf above the diagonal
    and past SEQ; also q . k."""
    dot = tl.dot(q, tl.trans(k))
    log_w = POWER * tl.log(tl.abs(dot * SCALE))
    if GATED:
        log_w += gates
    return tl.where((rows[:, None] >= cols[None, :]) & (cols[None, :] < SEQ), log_w, float("-inf")), dot


@triton.jit
def weight_gradients(q, k, v, dy, delta, log_normaliser, gates, rows, cols, SEQ, SCALE, POWER, GATED):
    """On a tile: P_ij = w_ij / l_i, d log w_ij = P_ij (dy_i . v_j - Delta_i), and d(q_i . k_j) = d log w_ij p / (q_i . k_j)."""
    log_w, dot = gated_log_weights(q, k, gates, rows, cols, SEQ, SCALE, POWER, GATED)
    probabilities = tl.exp(log_w - log_normaliser[:, None])
    d_log_w = probabilities * (tl.dot(dy, tl.trans(v)) - delta[:, None])
    is_zero = dot == 0.0  # there P = 0, and so is the gradient
    d_dot = tl.where(is_zero, 0.0, d_log_w * POWER / tl.where(is_zero, 1.0, dot))
    return probabilities, d_log_w, d_dot


@triton.jit
def accumulate_key_gradients(
    k, v, gate_cols, gate_cols_lo, cols, dk, dv, dg, Q, DY, DELTA, LOG_NORMALISER, G, G_LO, tile_base, value_base, row_base, query_start, query_end,
    SEQ, HEADS, DIM, DIM_V, SCALE, POWER, GATED, BLOCK_M,
):
    """Add the gradients of one key block from queries query_start..query_end (block-aligned):
    dv_j += sum_i P_ij dy_i, dk_j += sum_i d(q_i . k_j) q_i, dG_j -= sum_i d log w_ij."""
    for start in range(query_start, query_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < SEQ
        q, dy = load_tile(Q, tile_base, rows, SEQ, HEADS, DIM), load_tile(DY, value_base, rows, SEQ, HEADS, DIM_V)
        delta, log_normaliser = load_row(DELTA, row_base, rows, SEQ, HEADS), load_row(LOG_NORMALISER, row_base, rows, SEQ, HEADS)
        gate_rows, gate_rows_lo = load_gates(G, G_LO, row_base, rows, SEQ, HEADS)
        gates = gate_differences(gate_rows, gate_rows_lo, gate_cols, gate_cols_lo)
        probabilities, d_log_w, d_dot = weight_gradients(q, k, v, dy, delta, log_normaliser, gates, rows, cols, SEQ, SCALE, POWER, GATED)
        probabilities = tl.where(row_ok[:, None], probabilities, 0.0)
        d_log_w = tl.where(row_ok[:, None], d_log_w, 0.0)
        d_dot = tl.where(row_ok[:, None], d_dot, 0.0)
        dv += tl.dot(tl.trans(probabilities).to(dy.dtype), dy)
        dk += tl.dot(tl.trans(d_dot).to(q.dtype), q)
        dg -= tl.sum(d_log_w, axis=0)
    return dk, dv, dg


@triton.jit
def accumulate_query_gradients(
    q, dy, delta, log_normaliser, gate_rows, gate_rows_lo, rows, dq, dg, K, V, G, G_LO, tile_base, value_base, row_base, key_start, key_end,
    SEQ, HEADS, DIM, DIM_V, SCALE, POWER, GATED, BLOCK_N,
):
    """Add dq_i += sum_j d(q_i . k_j) k_j and dG_i += sum_j d log w_ij over keys key_start..key_end (block-aligned)."""
    for start in range(key_start, key_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k, v = load_tile(K, tile_base, cols, SEQ, HEADS, DIM), load_tile(V, value_base, cols, SEQ, HEADS, DIM_V)
        gate_cols, gate_cols_lo = load_gates(G, G_LO, row_base, cols, SEQ, HEADS)
        gates = gate_differences(gate_rows, gate_rows_lo, gate_cols, gate_cols_lo)
        _, d_log_w, d_dot = weight_gradients(q, k, v, dy, delta, log_normaliser, gates, rows, cols, SEQ, SCALE, POWER, GATED)
        dq += tl.dot(d_dot.to(k.dtype), k)
        dg += tl.sum(d_log_w, axis=1)
    return dq, dg


def power_attention_backward_keys(
    Q, K, V, G, G_LO, DY, DELTA, LOG_NORMALISER, DK, DV, DG,
    SEQ, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, SCALE: tl.constexpr, POWER: tl.constexpr,
    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv and the column part of dG for one key block, over the query blocks at or below its
    diagonal: DELTA_i = dy_i . y_i, dG_j -= sum_i d log w_ij."""
    block_n = tl.program_id(0)
    tile_base, value_base, row_base = head_bases(SEQ, HEADS, DIM, DIM_V)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v = load_tile(K, tile_base, cols, SEQ, HEADS, DIM), load_tile(V, value_base, cols, SEQ, HEADS, DIM_V)
    gate_cols, gate_cols_lo = load_gates(G, G_LO, row_base, cols, SEQ, HEADS)
    dk, dv, dg = accumulate_key_gradients(
        k, v, gate_cols, gate_cols_lo, cols, tl.zeros([BLOCK_N, DIM], tl.float32), tl.zeros([BLOCK_N, DIM_V], tl.float32),
        tl.zeros([BLOCK_N], tl.float32), Q, DY, DELTA, LOG_NORMALISER, G, G_LO, tile_base, value_base, row_base,
        (block_n * BLOCK_N // BLOCK_M) * BLOCK_M, SEQ, SEQ, HEADS, DIM, DIM_V, SCALE, POWER, GATED, BLOCK_M,
    )
    store_tile(DK, tile_base, cols, dk, SEQ, HEADS, DIM)
    store_tile(DV, value_base, cols, dv, SEQ, HEADS, DIM_V)
    store_row(DG, row_base, cols, dg, SEQ, HEADS)


def power_attention_backward_queries(
    Q, K, V, G, G_LO, DY, DELTA, LOG_NORMALISER, DQ, DG_ROWS,
    SEQ, HEADS: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, SCALE: tl.constexpr, POWER: tl.constexpr,
    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq and the row part of dG for one query block, over the key blocks up to the diagonal:
    dq_i = sum_j d(q_i . k_j) k_j, dG_i = sum_j d log w_ij. The row part is 0 in exact arithmetic
    (y_i does not change when its weights scale alike), but with it the rounding of each P_ij
    cancels in the reverse cumulative sum that makes d log_g, instead of growing with seq."""
    block_m = tl.program_id(0)
    tile_base, value_base, row_base = head_bases(SEQ, HEADS, DIM, DIM_V)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q, dy = load_tile(Q, tile_base, rows, SEQ, HEADS, DIM), load_tile(DY, value_base, rows, SEQ, HEADS, DIM_V)
    delta, log_normaliser = load_row(DELTA, row_base, rows, SEQ, HEADS), load_row(LOG_NORMALISER, row_base, rows, SEQ, HEADS)
    gate_rows, gate_rows_lo = load_gates(G, G_LO, row_base, rows, SEQ, HEADS)
    dq, dg = accumulate_query_gradients(
        q, dy, delta, log_normaliser, gate_rows, gate_rows_lo, rows, tl.zeros([BLOCK_M, DIM], tl.float32), tl.zeros([BLOCK_M], tl.float32),
        K, V, G, G_LO, tile_base, value_base, row_base, 0, (block_m + 1) * BLOCK_M, SEQ, HEADS, DIM, DIM_V, SCALE, POWER, GATED, BLOCK_N,
    )
    store_tile(DQ, tile_base, rows, dq, SEQ, HEADS, DIM)
    store_row(DG_ROWS, row_base, rows, dg, SEQ, HEADS)


def gpu_tilings(dim: int, itemsize: int) -> dict:
    """Each kernel's GPU tiling (launch.Tiling) for q and k rows of dim elements of itemsize
    bytes. Compiled for sm_90 at head dims 16..128, p = 2 and 4, bf16 and float32, ptxas spills
    no registers with these, with triton 3.7 and with 3.6 (the lent H100's). The forward pass
    takes 128 query rows a program, as flash attention does on an H100, but 64 for 512-byte rows
    (float32 at dim 128), whose tiles would need 257 KiB of shared memory; the backward passes
    take 32 rows of keys a tile (at 64, dim 64 in float32 spilled 452 bytes a thread), and the
    backward keys kernel 32 rows of queries for 512-byte rows (at 64, triton 3.6 spilled 156)."""
    wide_rows = dim * itemsize > 256
    return {
        power_attention_forward: Tiling(64 if wide_rows else 128, 64, num_warps=8),
        power_attention_backward_keys: Tiling(32 if wide_rows else 64, 32, num_warps=8),
        power_attention_backward_queries: Tiling(64, 32, num_warps=8),
    }


def kernel_tilings(q, tiling_overrides=None) -> dict:
    """Each kernel's tiling here; a tuning sweep (ops.tune) may replace some."""
    return tilings(gpu_tilings(q.shape[-1], q.dtype.itemsize)) | (tiling_overrides or {})


def kernel_constants(q, v, gated: bool, p: int, scale: float) -> dict:
    """The scalars every flash kernel takes (and the tile rows, from its tiling): SEQ at run time, the rest constexprs."""
    batch, seq, heads, dim = q.shape
    return dict(SEQ=seq, HEADS=heads, DIM=dim, DIM_V=v.shape[-1], SCALE=scale, POWER=p, GATED=gated)


def exact_gate(log_g):
    """The cumulative gate G = cumsum(log_g) [batch, seq, heads] as a pair (hi, lo) of float32."""
    return exact_cumsum(log_g, axis=1)


def attention_forward(q, k, v, gate, p: int, scale: float, gated: bool, tiling_overrides=None):
    """(y, log normaliser) through the forward kernel; gate is the cumulative gate G as (hi, lo)."""
    batch, seq, heads, _ = q.shape
    out_shapes = [jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct((batch, seq, heads), jnp.float32)]
    tiles = kernel_tilings(q, tiling_overrides)[power_attention_forward]
    grid = (math.ceil(seq / tiles.query_rows), batch * heads)
    return launch(power_attention_forward, grid, [q, k, v, *gate], out_shapes, tiles, **kernel_constants(q, v, gated, p, scale))


def log_weight_delta(dy, y, d_log_normaliser=None):
    """delta_i in the backward kernels' d log w_ij = P_ij (dy_i . v_j - delta_i), P_ij = w_ij / sum_j w_ij.
    For a loss of y alone delta_i = dy_i . y_i; a gradient c_i in the log-normaliser log sum_j w_ij
    adds c_i P_ij, so it enters as delta_i - c_i."""
    delta = jnp.sum(dy.astype(jnp.float32) * y.astype(jnp.float32), axis=-1)
    return delta if d_log_normaliser is None else delta - d_log_normaliser


def attention_backward(q, k, v, gate, y, log_normaliser, dy, p: int, scale: float, gated: bool, tiling_overrides=None, d_log_normaliser=None):
    """(dq, dk, dv, dG) through the two backward kernels; d_log_normaliser as in `log_weight_delta`."""
    batch, seq, heads, _ = q.shape
    constants = kernel_constants(q, v, gated, p, scale)
    delta = log_weight_delta(dy, y, d_log_normaliser)
    inputs = [q, k, v, *gate, dy, delta, log_normaliser]
    rows = jax.ShapeDtypeStruct(log_normaliser.shape, jnp.float32)
    here = kernel_tilings(q, tiling_overrides)
    keys, queries = here[power_attention_backward_keys], here[power_attention_backward_queries]
    dk, dv, dgate_columns = launch(
        power_attention_backward_keys, (math.ceil(seq / keys.key_rows), batch * heads), inputs,
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype), rows], keys, **constants,
    )
    dq, dgate_rows = launch(
        power_attention_backward_queries, (math.ceil(seq / queries.query_rows), batch * heads), inputs,
        [jax.ShapeDtypeStruct(q.shape, q.dtype), rows], queries, **constants,
    )
    return dq, dk, dv, dgate_rows + dgate_columns


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def triton_attention(q, k, v, log_g, p: int, scale: float, gated: bool):
    """Gated power attention through the Triton kernels: y and the log of its normaliser
    (log sum_j w_ij, +inf where a row has no weight), differentiable in q, k, v and log_g."""
    y, log_normaliser = attention_forward(q, k, v, exact_gate(log_g), p, scale, gated)
    return y, log_normaliser  # a tuple, as the forward rule's (launch gives a list)


def triton_attention_forward(q, k, v, log_g, p, scale, gated):
    gate = exact_gate(log_g)
    y, log_normaliser = attention_forward(q, k, v, gate, p, scale, gated)
    return (y, log_normaliser), (q, k, v, gate, y, log_normaliser)


def triton_attention_backward(p, scale, gated, residuals, cotangents):
    q, k, v, gate, y, log_normaliser = residuals
    dy, d_log_normaliser = cotangents
    dq, dk, dv, dgate = attention_backward(q, k, v, gate, y, log_normaliser, dy, p, scale, gated, d_log_normaliser=d_log_normaliser)
    # G is the cumulative sum of log_g, so d log_g_u = sum_{t >= u} dG_t.
    d_log_g = jnp.flip(jnp.cumsum(jnp.flip(dgate, axis=1), axis=1), axis=1).astype(gate[0].dtype)
    return dq, dk, dv, d_log_g


triton_attention.defvjp(triton_attention_forward, triton_attention_backward)


TRITON_DIMS = (16, 32, 64, 128)


def check_dims(q, v) -> None:
    """Head dims the kernels' tiles take, and batch entries small enough for their int32 offsets."""
    if q.shape[-1] not in TRITON_DIMS or v.shape[-1] not in TRITON_DIMS:
        raise ValueError(f"impl='triton' needs head dims of q, k and of v in {TRITON_DIMS}; got {q.shape[-1]} and {v.shape[-1]}")
    _, seq, heads, _ = q.shape
    entry = seq * heads * max(q.shape[-1], v.shape[-1])
    if entry >= 2**31:
        raise ValueError(f"impl='triton' indexes within one batch entry in int32; seq x heads x dim = {entry} elements is 2^31 or more")


def attention(q, k, v, log_g, p: int, scale: float):
    """The whole op through the flash-style kernels (O(T^2 d) work, O(T d) memory): (y, log normaliser)."""
    check_dims(q, v)
    gated = log_g is not None
    log_g = log_g if gated else jnp.zeros(q.shape[:3], jnp.float32)
    return triton_attention(q, k, v, log_g.astype(jnp.float32), p, scale, gated)
