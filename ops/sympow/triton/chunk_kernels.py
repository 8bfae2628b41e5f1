"""The chunked kernels' outputs stage (p = 2): each chunk's outputs from the state entering it
(ops.sympow.triton.state_kernels) and the chunk's own keys, and their backward kernels.

    y_i = [exp(L_i) phi(r q_i)^T S_m + sum_{j in m, j <= i} w_ij v_j] / [the same with z and 1]
with r = sqrt(scale) and w_ij the gated power weights inside the chunk, evaluated in log space by
the flash-attention helpers (ops.sympow.triton.tiles); the state, in the tiled layout, is the
first term of the running row max and sums.

Every program runs for one query head (axis 1: batch x HEADS) and reads its key/value head's
keys, values, gate and states in place (HEADS // KV_HEADS query heads to a key/value head). What
a kernel writes of a key/value head's gradient (dk, dv, dL) is its query head's share, which the
host sums over the group; the state's part of a key's gradient is added by the group's first
query head alone.

Kernels, and their programs (axis 0, axis 1 batch x query head):
    power_chunk_forward               (query block): y and the log-normaliser.
    power_chunk_backward_queries      (query block): dq and the row part of dL.
    power_chunk_backward_local_keys   (key block): dk, dv and the column part of dL from the chunk's queries
                                      (the outputs stage's backward alone).
    power_chunk_backward_keys         (key block): the same plus the keys' shares in the state after their
                                      chunk (the fused backward of both stages).
"""

import triton
import triton.language as tl

from ops.sympow.triton.state_kernels import state_key_gradients
from ops.sympow.triton.tiled_state import (
    NARROW,
    WIDE,
    add_tile_gradient,
    as_input,
    joined_gradient,
    key_root_decay,
    load_state,
    scaled_blocks,
    state_shares,
    state_tile_index,
    tile_blocks,
    tile_features,
)
from ops.sympow.triton.tiles import (
    accumulate_key_gradients,
    accumulate_keys,
    accumulate_query_gradients,
    load_gates,
    load_keys,
    load_query_gradients,
    load_tile,
    query_and_key_value_bases,
    store_outputs,
    store_row,
    store_tile,
)


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
    KV_HEADS: tl.constexpr,
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
    batch, head, kv_head, q_base, y_base, row_base, k_base, v_base, gate_base = query_and_key_value_bases(
        seq_len, HEADS, KV_HEADS, DIM, DIM_V
    )
    # Every pointer below moves to this program's (batch, query head) or its key/value head.
    q_ptr += q_base
    y_ptr += y_base
    log_normaliser_ptr += row_base
    k_ptr += k_base
    v_ptr += v_base
    l_ptr += gate_base
    l_lo_ptr += gate_base
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = block_m * BLOCK_M // CHUNK
    row_hi, row_lo = load_gates(g_ptr=l_ptr, g_lo_ptr=l_lo_ptr, positions=rows, seq_len=seq_len, HEADS=KV_HEADS)

    numerator = tl.zeros([BLOCK_M, DIM_V], tl.float32)  # [BLOCK_M, DIM_V]
    denominator = tl.zeros([BLOCK_M], tl.float32)  # [BLOCK_M]
    for feature_tile in range(FEATURE_TILES):
        narrow, wide, _ = tile_blocks(narrow_blocks_ptr, wide_blocks_ptr, feature_tile)
        q_narrow, q_wide = scaled_blocks(
            q_ptr, rows, narrow, wide, scale=ROOT_SCALE, seq_len=seq_len, HEADS=HEADS, DIM=DIM
        )
        phi = tile_features(x_narrow=q_narrow, x_wide=q_wide, ROWS=BLOCK_M)  # [BLOCK_M, TILE_FEATURES]
        tile_index = state_tile_index(batch, kv_head, chunk, feature_tile, seq_len, KV_HEADS, CHUNK, FEATURE_TILES)
        state, norm = load_state(s_ptr, z_ptr, tile_index, DIM_V)
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
    q = load_tile(q_ptr, rows, seq_len, HEADS, DIM)  # [BLOCK_M, DIM]
    row_max, row_sum, acc = accumulate_keys(
        q,
        row_hi,
        row_lo,
        rows,
        row_max,
        row_sum,
        acc,
        k_ptr,
        v_ptr,
        g_ptr=l_ptr,
        g_lo_ptr=l_lo_ptr,
        key_start=chunk * CHUNK,
        key_end=(block_m + 1) * BLOCK_M,
        seq_len=seq_len,
        KV_HEADS=KV_HEADS,
        DIM=DIM,
        DIM_V=DIM_V,
        SCALE=SCALE,
        POWER=2,
        GATED=True,
        BLOCK_N=BLOCK_N,
    )
    store_outputs(y_ptr, log_normaliser_ptr, rows, row_max, row_sum, acc, seq_len, HEADS, DIM_V)


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
    KV_HEADS: tl.constexpr,
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
    batch, head, kv_head, q_base, y_base, row_base, k_base, v_base, gate_base = query_and_key_value_bases(
        seq_len, HEADS, KV_HEADS, DIM, DIM_V
    )
    # Every pointer below moves to this program's (batch, query head) or its key/value head.
    q_ptr += q_base
    dq_ptr += q_base
    dy_ptr += y_base
    delta_ptr += row_base
    log_normaliser_ptr += row_base
    dl_rows_ptr += row_base  # this query head's share: the host sums the group's
    k_ptr += k_base
    v_ptr += v_base
    l_ptr += gate_base
    l_lo_ptr += gate_base
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = block_m * BLOCK_M // CHUNK
    q, dy, delta, log_normaliser, row_hi, row_lo = load_query_gradients(
        q_ptr,
        dy_ptr,
        delta_ptr,
        log_normaliser_ptr,
        g_ptr=l_ptr,
        g_lo_ptr=l_lo_ptr,
        rows=rows,
        seq_len=seq_len,
        HEADS=HEADS,
        KV_HEADS=KV_HEADS,
        DIM=DIM,
        DIM_V=DIM_V,
    )
    dq = tl.zeros([BLOCK_M, DIM], tl.float32)  # [BLOCK_M, DIM]
    dl = tl.zeros([BLOCK_M], tl.float32)  # [BLOCK_M]
    dq, dl = accumulate_query_gradients(
        q,
        dy,
        delta,
        log_normaliser,
        row_hi,
        row_lo,
        rows,
        dq,
        dg=dl,
        k_ptr=k_ptr,
        v_ptr=v_ptr,
        g_ptr=l_ptr,
        g_lo_ptr=l_lo_ptr,
        key_start=chunk * CHUNK,
        key_end=(block_m + 1) * BLOCK_M,
        seq_len=seq_len,
        KV_HEADS=KV_HEADS,
        DIM=DIM,
        DIM_V=DIM_V,
        SCALE=SCALE,
        POWER=2,
        GATED=True,
        BLOCK_N=BLOCK_N,
    )

    share = state_shares(l_ptr, log_normaliser_ptr, rows, seq_len, HEADS, KV_HEADS)
    d_numerator = as_input(dy * share[:, None], dy_ptr)  # [BLOCK_M, DIM_V]
    d_norm = -delta * share  # [BLOCK_M]
    d_narrow_blocks = tl.zeros([BLOCK_M, DIM // NARROW, NARROW], tl.float32)  # [BLOCK_M, DIM / NARROW, NARROW]
    d_wide_blocks = tl.zeros([BLOCK_M, DIM // WIDE, WIDE], tl.float32)  # [BLOCK_M, DIM / WIDE, WIDE]
    for feature_tile in range(FEATURE_TILES):
        narrow, wide, _ = tile_blocks(narrow_blocks_ptr, wide_blocks_ptr, feature_tile)
        q_narrow, q_wide = scaled_blocks(
            q_ptr, rows, narrow, wide, scale=ROOT_SCALE, seq_len=seq_len, HEADS=HEADS, DIM=DIM
        )
        tile_index = state_tile_index(batch, kv_head, chunk, feature_tile, seq_len, KV_HEADS, CHUNK, FEATURE_TILES)
        state, norm = load_state(s_ptr, z_ptr, tile_index, DIM_V)
        # [BLOCK_M, DIM_V] @ [DIM_V, TILE_FEATURES] -> [BLOCK_M, TILE_FEATURES]
        d_phi = tl.dot(d_numerator, tl.trans(as_input(state, dy_ptr))) + d_norm[:, None] * norm[None, :]
        dl += tl.sum(tile_features(x_narrow=q_narrow, x_wide=q_wide, ROWS=BLOCK_M) * d_phi, axis=1)
        d_narrow_blocks, d_wide_blocks = add_tile_gradient(
            d_narrow_blocks,
            d_wide_blocks,
            d_features=d_phi,
            x_narrow=q_narrow,
            x_wide=q_wide,
            narrow=narrow,
            wide=wide,
            ROWS=BLOCK_M,
            DIM=DIM,
        )
    d_q_state = joined_gradient(d_narrow_blocks, d_wide_blocks, ROWS=BLOCK_M, DIM=DIM)
    store_tile(dq_ptr, rows, dq + d_q_state * ROOT_SCALE, seq_len, HEADS, DIM)
    store_row(dl_rows_ptr, rows, dl, seq_len, HEADS)


@triton.jit
def local_key_gradients(
    k,
    v,
    col_hi,
    col_lo,
    cols,
    block_n,
    chunk,
    q_ptr,
    dy_ptr,
    delta_ptr,
    log_normaliser_ptr,
    l_ptr,
    l_lo_ptr,
    seq_len,
    HEADS,
    KV_HEADS,
    DIM,
    DIM_V,
    CHUNK,
    SCALE,
    BLOCK_M,
    BLOCK_N,
):
    """dk [BLOCK_N, DIM], dv [BLOCK_N, DIM_V] and dL [BLOCK_N] of a key block from the queries of its
    chunk (of one query head: its share), as in flash attention."""
    dk = tl.zeros([BLOCK_N, DIM], tl.float32)  # [BLOCK_N, DIM]
    dv = tl.zeros([BLOCK_N, DIM_V], tl.float32)  # [BLOCK_N, DIM_V]
    dl = tl.zeros([BLOCK_N], tl.float32)  # [BLOCK_N]
    return accumulate_key_gradients(
        k,
        v,
        col_hi,
        col_lo,
        cols,
        dk,
        dv,
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
        KV_HEADS=KV_HEADS,
        DIM=DIM,
        DIM_V=DIM_V,
        SCALE=SCALE,
        POWER=2,
        GATED=True,
        BLOCK_M=BLOCK_M,
    )


def power_chunk_backward_local_keys(
    q_ptr,
    k_ptr,
    v_ptr,
    l_ptr,
    l_lo_ptr,
    dy_ptr,
    delta_ptr,
    log_normaliser_ptr,
    dk_ptr,
    dv_ptr,
    dl_ptr,
    seq_len,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    CHUNK: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dk, dv and dL for one key block from the queries of its chunk alone (local_key_gradients)."""
    block_n = tl.program_id(0)
    batch, head, kv_head, q_base, y_base, row_base, k_base, v_base, gate_base = query_and_key_value_bases(
        seq_len, HEADS, KV_HEADS, DIM, DIM_V
    )
    # Every pointer below moves to this program's (batch, query head) or its key/value head; dk,
    # dv and dL are this query head's shares (the host sums the group's).
    q_ptr += q_base
    dk_ptr += q_base
    dy_ptr += y_base
    dv_ptr += y_base
    delta_ptr += row_base
    log_normaliser_ptr += row_base
    dl_ptr += row_base
    k_ptr += k_base
    v_ptr += v_base
    l_ptr += gate_base
    l_lo_ptr += gate_base
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = block_n * BLOCK_N // CHUNK
    k, v, col_hi, col_lo = load_keys(
        k_ptr, v_ptr, g_ptr=l_ptr, g_lo_ptr=l_lo_ptr, cols=cols, seq_len=seq_len, HEADS=KV_HEADS, DIM=DIM, DIM_V=DIM_V
    )
    dk, dv, dl = local_key_gradients(
        k,
        v,
        col_hi,
        col_lo,
        cols,
        block_n,
        chunk,
        q_ptr,
        dy_ptr,
        delta_ptr,
        log_normaliser_ptr,
        l_ptr,
        l_lo_ptr,
        seq_len,
        HEADS,
        KV_HEADS,
        DIM,
        DIM_V,
        CHUNK,
        SCALE,
        BLOCK_M,
        BLOCK_N,
    )
    store_tile(dk_ptr, cols, dk, seq_len, HEADS, DIM)
    store_tile(dv_ptr, cols, dv, seq_len, HEADS, DIM=DIM_V)
    store_row(dl_ptr, cols, dl, seq_len, HEADS)


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
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    CHUNK: tl.constexpr,
    FEATURE_TILES: tl.constexpr,
    SCALE: tl.constexpr,
    ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dk, dv and dL for one key block: from the chunk's queries (local_key_gradients) and from the
    keys' shares in the state after their chunk (state_key_gradients), whose end-gate part
    through_state is stored too. ds and dz are the key/value head's, so the group's first query
    head alone adds their part (the others store through_state 0)."""
    block_n = tl.program_id(0)
    batch, head, kv_head, q_base, y_base, row_base, k_base, v_base, gate_base = query_and_key_value_bases(
        seq_len, HEADS, KV_HEADS, DIM, DIM_V
    )
    # Every pointer below moves to this program's (batch, query head) or its key/value head; dk,
    # dv and dL are this query head's shares (the host sums the group's).
    q_ptr += q_base
    dk_ptr += q_base
    dy_ptr += y_base
    dv_ptr += y_base
    delta_ptr += row_base
    log_normaliser_ptr += row_base
    dl_ptr += row_base
    through_state_ptr += row_base
    k_ptr += k_base
    v_ptr += v_base
    l_ptr += gate_base
    l_lo_ptr += gate_base
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = block_n * BLOCK_N // CHUNK
    k, v, col_hi, col_lo = load_keys(
        k_ptr, v_ptr, g_ptr=l_ptr, g_lo_ptr=l_lo_ptr, cols=cols, seq_len=seq_len, HEADS=KV_HEADS, DIM=DIM, DIM_V=DIM_V
    )
    dk, dv, dl = local_key_gradients(
        k,
        v,
        col_hi,
        col_lo,
        cols,
        block_n,
        chunk,
        q_ptr,
        dy_ptr,
        delta_ptr,
        log_normaliser_ptr,
        l_ptr,
        l_lo_ptr,
        seq_len,
        HEADS,
        KV_HEADS,
        DIM,
        DIM_V,
        CHUNK,
        SCALE,
        BLOCK_M,
        BLOCK_N,
    )
    through_state = tl.zeros([BLOCK_N], tl.float32)  # [BLOCK_N]
    if head % (HEADS // KV_HEADS) == 0:
        root_decay = key_root_decay(l_ptr, l_lo_ptr, cols, chunk, seq_len, KV_HEADS, CHUNK, ROOT_SCALE)  # [BLOCK_N]
        dk_state, dv_state, through_state = state_key_gradients(
            k_ptr,
            v,
            ds_ptr,
            dz_ptr,
            narrow_blocks_ptr,
            wide_blocks_ptr,
            root_decay,
            cols,
            batch,
            kv_head,
            chunk,
            seq_len,
            KV_HEADS,
            DIM,
            DIM_V,
            CHUNK,
            FEATURE_TILES,
            BLOCK_N,
        )
        dk += dk_state
        dv += dv_state
        dl -= through_state
    store_tile(dk_ptr, cols, dk, seq_len, HEADS, DIM)
    store_tile(dv_ptr, cols, dv, seq_len, HEADS, DIM=DIM_V)
    store_row(dl_ptr, cols, dl, seq_len, HEADS)
    store_row(through_state_ptr, cols, through_state, seq_len, HEADS)
