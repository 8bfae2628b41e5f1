"""What a program of either kernel family does with one tile: load and store it, weigh it in
log space, and fold it into flash-style running sums (the forward pass and both backward
passes of the gated power weights). The flash kernels (attention.py) are these over all key
blocks up to the diagonal; the chunked kernels (chunk_kernels.py, state_kernels.py) use them inside each chunk.

Conventions (both kernel families): pointers are lowercase and end in `_ptr`, constexprs are
uppercase, seq_len is the one run-time scalar; a kernel first moves its pointers to its
program's (batch, head) (a group loop: to each of its query heads' in turn), so helpers index
one head's [seq, width] slice. An argument is passed by position where it cannot be mistaken for
its neighbour (a variable of the parameter's own name, the one pointer, rows or cols as
positions), by keyword from the first that could. A `# [rows, cols]` comment (or the loader's
docstring) gives each tile's shape, in BLOCK_M (query rows), BLOCK_N (key rows), DIM (q and k
columns) and DIM_V (v and y columns), and a `# [rows, cols] @ [cols, n] -> [rows, n]` comment
each tl.dot's.
"""

import triton
import triton.language as tl

from ops.sympow import numerics

EPS = tl.constexpr(numerics.EPS)  # a kernel reads only constexpr globals


# q, k and their gradients are [batch, seq, heads, DIM]; v, y and theirs [batch, seq, heads, DIM_V];
# G and the per-row statistics [batch, seq, heads]; all contiguous. Program axis 1 runs over
# batch x heads (the scans' over batch x KV_HEADS). With grouped heads k, v and G (and their
# gradients) have KV_HEADS heads, each serving HEADS // KV_HEADS query heads, and the rest HEADS;
# a helper's HEADS (or KV_HEADS) is the stride of what it reads.
@triton.jit
def slice_bases(batch, head, seq_len, HEADS, DIM, DIM_V):
    """Offsets of (batch, head) in a [batch, seq, HEADS, DIM] array (q, k), a [batch, seq, HEADS,
    DIM_V] array (v, y) and a [batch, seq, HEADS] array (gates, row statistics), in int64: a whole
    batch may pass 2^31 elements (offsets within one batch entry stay int32)."""
    qk_base = batch * seq_len * HEADS * DIM + head * DIM
    v_base = batch * seq_len * HEADS * DIM_V + head * DIM_V
    row_base = batch * seq_len * HEADS + head
    return qk_base, v_base, row_base


@triton.jit
def program_batch_head(HEADS):
    """This program's (batch, head) of axis 1's batch x HEADS, in int64."""
    batch_head = tl.program_id(1).to(tl.int64)
    return batch_head // HEADS, batch_head % HEADS


@triton.jit
def query_and_key_value_bases(seq_len, HEADS, KV_HEADS, DIM, DIM_V):
    """This program's batch, query head and key/value head, with slice_bases of the query head
    (q, y, rows) and of the key/value head (k, v, gates)."""
    batch, head = program_batch_head(HEADS)
    kv_head = head // (HEADS // KV_HEADS)
    q_base, y_base, row_base = slice_bases(batch, head, seq_len, HEADS, DIM, DIM_V)
    k_base, v_base, gate_base = slice_bases(batch, kv_head, seq_len, KV_HEADS, DIM, DIM_V)
    return batch, head, kv_head, q_base, y_base, row_base, k_base, v_base, gate_base


@triton.jit
def load_columns(x_ptr, positions, block, seq_len, HEADS, DIM, WIDTH):
    """Rows `positions`, columns block * WIDTH .. (block + 1) * WIDTH of this head's [seq, DIM]
    slice: [len(positions), WIDTH], zeros past seq_len."""
    columns = block * WIDTH + tl.arange(0, WIDTH)
    offsets = positions[:, None] * (HEADS * DIM) + columns[None, :]
    return tl.load(x_ptr + offsets, mask=(positions < seq_len)[:, None], other=0.0)


@triton.jit
def load_tile(x_ptr, positions, seq_len, HEADS, DIM):
    """Rows `positions` of this head's [seq, DIM] slice: [len(positions), DIM], zeros past seq_len."""
    return load_columns(x_ptr, positions, block=0, seq_len=seq_len, HEADS=HEADS, DIM=DIM, WIDTH=DIM)


@triton.jit
def store_tile(x_ptr, positions, tile, seq_len, HEADS, DIM):
    columns = tl.arange(0, DIM)
    offsets = positions[:, None] * (HEADS * DIM) + columns[None, :]
    tl.store(x_ptr + offsets, tile, mask=(positions < seq_len)[:, None])


@triton.jit
def load_row(x_ptr, positions, seq_len, HEADS):
    """Entries `positions` of this head's [seq] slice; zeros past seq_len."""
    return tl.load(x_ptr + positions * HEADS, mask=positions < seq_len, other=0.0)


@triton.jit
def store_row(x_ptr, positions, row, seq_len, HEADS):
    tl.store(x_ptr + positions * HEADS, row, mask=positions < seq_len)


@triton.jit
def load_gates(g_ptr, g_lo_ptr, positions, seq_len, HEADS):
    """hi and lo of the cumulative gate at `positions` of this head."""
    hi = load_row(g_ptr, positions, seq_len, HEADS)
    lo = load_row(g_lo_ptr, positions, seq_len, HEADS)
    return hi, lo


@triton.jit
def load_keys(k_ptr, v_ptr, g_ptr, g_lo_ptr, cols, seq_len, HEADS, DIM, DIM_V):
    """A block of keys: k [cols, DIM], v [cols, DIM_V] and their cumulative gates (hi, lo) [cols]."""
    k = load_tile(k_ptr, cols, seq_len, HEADS, DIM)
    v = load_tile(v_ptr, cols, seq_len, HEADS, DIM=DIM_V)
    g_hi, g_lo = load_gates(g_ptr, g_lo_ptr, cols, seq_len, HEADS)
    return k, v, g_hi, g_lo


@triton.jit
def load_query_gradients(
    q_ptr, dy_ptr, delta_ptr, log_normaliser_ptr, g_ptr, g_lo_ptr, rows, seq_len, HEADS, KV_HEADS, DIM, DIM_V
):
    """What a backward pass needs of a block of queries: q [rows, DIM], dy [rows, DIM_V], and per
    row delta, the log-normaliser and the cumulative gate (hi, lo), the gate's of the key/value head."""
    q = load_tile(q_ptr, rows, seq_len, HEADS, DIM)
    dy = load_tile(dy_ptr, rows, seq_len, HEADS, DIM=DIM_V)
    delta = load_row(delta_ptr, rows, seq_len, HEADS)
    log_normaliser = load_row(log_normaliser_ptr, rows, seq_len, HEADS)
    g_hi, g_lo = load_gates(g_ptr, g_lo_ptr, rows, seq_len, KV_HEADS)
    return q, dy, delta, log_normaliser, g_hi, g_lo


@triton.jit
def gate_differences(row_hi, row_lo, col_hi, col_lo):
    """G_i - G_j on a tile [rows, cols]: the hi parts subtract with one rounding, relative to the difference."""
    return (row_hi[:, None] - col_hi[None, :]) + (row_lo[:, None] - col_lo[None, :])


@triton.jit
def gated_log_weights(q, k, gates, rows, cols, seq_len, SCALE, POWER, GATED):
    """log w = p log|s q . k| + G_i - G_j on a tile [rows, cols] (gates: G_i - G_j), -inf above
    the diagonal and past seq_len; also q . k [rows, cols]."""
    # [rows, DIM] @ [DIM, cols] -> [rows, cols]
    dot = tl.dot(q, tl.trans(k))
    log_w = POWER * tl.log(tl.abs(dot * SCALE))
    if GATED:
        log_w += gates
    causal = (rows[:, None] >= cols[None, :]) & (cols[None, :] < seq_len)
    return tl.where(causal, log_w, float("-inf")), dot


@triton.jit
def accumulate_keys(
    q,
    row_hi,
    row_lo,
    rows,
    row_max,
    row_sum,
    acc,
    k_ptr,
    v_ptr,
    g_ptr,
    g_lo_ptr,
    key_start,
    key_end,
    seq_len,
    KV_HEADS,
    DIM,
    DIM_V,
    SCALE,
    POWER,
    GATED,
    BLOCK_N,
):
    """Fold keys key_start..key_end (block-aligned, causal mask applied) into the rows' running
    max and weight sum [rows] and weighted sum of values acc [rows, DIM_V], rescaling to the new
    max as flash attention does. k, v and the gates have KV_HEADS heads."""
    for start in range(key_start, key_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k, v, col_hi, col_lo = load_keys(k_ptr, v_ptr, g_ptr, g_lo_ptr, cols, seq_len, KV_HEADS, DIM, DIM_V)
        gates = gate_differences(row_hi, row_lo, col_hi, col_lo)  # [BLOCK_M, BLOCK_N]
        log_w, _ = gated_log_weights(q, k, gates, rows, cols, seq_len, SCALE, POWER, GATED)

        new_max = tl.maximum(row_max, tl.max(log_w, axis=1))  # [BLOCK_M]
        frame = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with no weight yet stays at 0
        w = tl.exp(log_w - frame[:, None])  # [BLOCK_M, BLOCK_N]
        rescale = tl.exp(row_max - frame)  # [BLOCK_M]
        row_sum = row_sum * rescale + tl.sum(w, axis=1)
        # [BLOCK_M, BLOCK_N] @ [BLOCK_N, DIM_V] -> [BLOCK_M, DIM_V]
        acc = acc * rescale[:, None] + tl.dot(w.to(v.dtype), v)
        row_max = new_max
    return row_max, row_sum, acc


@triton.jit
def store_outputs(y_ptr, log_normaliser_ptr, rows, row_max, row_sum, acc, seq_len, HEADS, DIM_V):
    """y = acc / max(row sum, eps), and the log-normaliser, +inf for a row with no weight so
    that the backward pass gives it probabilities exp(-inf) = 0 rather than NaN."""
    y = acc / tl.maximum(row_sum, EPS)[:, None]  # [rows, DIM_V]
    store_tile(y_ptr, rows, y, seq_len, HEADS, DIM=DIM_V)
    log_normaliser = tl.where(row_sum > 0, row_max + tl.log(row_sum), float("inf"))
    store_row(log_normaliser_ptr, rows, log_normaliser, seq_len, HEADS)


@triton.jit
def weight_gradients(q, k, v, dy, delta, log_normaliser, gates, rows, cols, seq_len, SCALE, POWER, GATED):
    """On a tile [rows, cols]: P_ij = w_ij / l_i, d log w_ij = P_ij (dy_i . v_j - delta_i), and
    d(q_i . k_j) = d log w_ij p / (q_i . k_j)."""
    log_w, dot = gated_log_weights(q, k, gates, rows, cols, seq_len, SCALE, POWER, GATED)
    probabilities = tl.exp(log_w - log_normaliser[:, None])
    # [rows, DIM_V] @ [DIM_V, cols] -> [rows, cols]
    d_log_w = probabilities * (tl.dot(dy, tl.trans(v)) - delta[:, None])
    is_zero = dot == 0.0  # there P = 0, and so is the gradient
    d_dot = tl.where(is_zero, 0.0, d_log_w * POWER / tl.where(is_zero, 1.0, dot))
    return probabilities, d_log_w, d_dot


@triton.jit
def accumulate_key_gradients(
    k,
    v,
    col_hi,
    col_lo,
    cols,
    dk,
    dv,
    dg,
    q_ptr,
    dy_ptr,
    delta_ptr,
    log_normaliser_ptr,
    g_ptr,
    g_lo_ptr,
    query_start,
    query_end,
    seq_len,
    HEADS,
    KV_HEADS,
    DIM,
    DIM_V,
    SCALE,
    POWER,
    GATED,
    BLOCK_M,
):
    """Add the gradients of one key block from queries query_start..query_end (block-aligned):
    dv_j += sum_i P_ij dy_i [cols, DIM_V], dk_j += sum_i d(q_i . k_j) q_i [cols, DIM],
    dG_j -= sum_i d log w_ij [cols]. The queries' arrays have HEADS heads, the gates KV_HEADS."""
    for start in range(query_start, query_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = (rows < seq_len)[:, None]  # [BLOCK_M, 1]
        q, dy, delta, log_normaliser, row_hi, row_lo = load_query_gradients(
            q_ptr, dy_ptr, delta_ptr, log_normaliser_ptr, g_ptr, g_lo_ptr, rows, seq_len, HEADS, KV_HEADS, DIM, DIM_V
        )
        gates = gate_differences(row_hi, row_lo, col_hi, col_lo)  # [BLOCK_M, cols]
        probabilities, d_log_w, d_dot = weight_gradients(
            q, k, v, dy, delta, log_normaliser, gates, rows, cols, seq_len, SCALE, POWER, GATED
        )
        probabilities = tl.where(row_ok, probabilities, 0.0)
        d_log_w = tl.where(row_ok, d_log_w, 0.0)
        d_dot = tl.where(row_ok, d_dot, 0.0)
        # [cols, BLOCK_M] @ [BLOCK_M, DIM_V] -> [cols, DIM_V]
        dv += tl.dot(tl.trans(probabilities).to(dy.dtype), dy)
        # [cols, BLOCK_M] @ [BLOCK_M, DIM] -> [cols, DIM]
        dk += tl.dot(tl.trans(d_dot).to(q.dtype), q)
        dg -= tl.sum(d_log_w, axis=0)
    return dk, dv, dg


@triton.jit
def accumulate_query_gradients(
    q,
    dy,
    delta,
    log_normaliser,
    row_hi,
    row_lo,
    rows,
    dq,
    dg,
    k_ptr,
    v_ptr,
    g_ptr,
    g_lo_ptr,
    key_start,
    key_end,
    seq_len,
    KV_HEADS,
    DIM,
    DIM_V,
    SCALE,
    POWER,
    GATED,
    BLOCK_N,
):
    """Add dq_i += sum_j d(q_i . k_j) k_j [rows, DIM] and dG_i += sum_j d log w_ij [rows] over keys
    key_start..key_end (block-aligned); k, v and the gates have KV_HEADS heads."""
    for start in range(key_start, key_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k, v, col_hi, col_lo = load_keys(k_ptr, v_ptr, g_ptr, g_lo_ptr, cols, seq_len, KV_HEADS, DIM, DIM_V)
        gates = gate_differences(row_hi, row_lo, col_hi, col_lo)  # [rows, BLOCK_N]
        _, d_log_w, d_dot = weight_gradients(
            q, k, v, dy, delta, log_normaliser, gates, rows, cols, seq_len, SCALE, POWER, GATED
        )
        # [rows, BLOCK_N] @ [BLOCK_N, DIM] -> [rows, DIM]
        dq += tl.dot(d_dot.to(k.dtype), k)
        dg += tl.sum(d_log_w, axis=1)
    return dq, dg
