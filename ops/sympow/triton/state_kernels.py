"""The chunked kernels' state stage and the state's gradients (p = 2): the scan that makes the
state entering every chunk, and the scans and key-block kernels that take gradients back
through it. Per batch x key/value head, with L the chunk-local cumulative gate and E_m the last L of
chunk m (as in ops.sympow.chunk), in the tiled layout of ops.sympow.triton.tiled_state:
    S_0 = 0,  S_{m+1} = exp(E_m) S_m + sum_{j in m} c phi(exp((E_m - L_j)/2) r k_j) v_j^T   (z likewise, with 1)
The running states and the stored S and z are float32; the state matmuls take their operands in
the inputs' dtype and accumulate in float32 (bf16 inputs take bf16 tensor-core matmuls:
docs/decisions.md).

With grouped heads the keys, values, gates and states belong to the KV_HEADS key/value heads,
each serving HEADS // KV_HEADS query heads: every kernel here runs a program per batch x key/value
head (axis 1), and those that read queries sum over the group's query heads in the program.

Kernels, and their programs (axis 0 as named, axis 1 batch x key/value head):
    power_state_scan              (feature tile x value column block): S_m for every chunk, one chunk after another.
    power_state_scan_backward     (the same): the gradient of each chunk's state contribution and of its end
                                  gate, from the chunks' queries (the fused backward of both stages).
    power_state_gradient_scan     (the same): the same from given gradients of the entering states (the
                                  state stage's backward alone).
    power_state_query_gradients   (the same; axis 2 the chunk): the gradient of each entering state from its
                                  chunk's queries (the outputs stage's backward alone).
    power_state_backward_keys     (key block): dk, dv and the end-gate share of each key's state contribution.
"""

import triton
import triton.language as tl

from ops.sympow.triton.tiled_state import (
    NARROW,
    TILE_FEATURES,
    WIDE,
    add_tile_gradient,
    as_input,
    chunk_end_gate,
    joined_gradient,
    key_root_decay,
    load_norm,
    load_state,
    scaled_blocks,
    scan_program,
    state_offsets,
    state_shares,
    state_tile_index,
    store_state_columns,
    tile_blocks,
    tile_features,
)
from ops.sympow.triton.tiles import (
    load_columns,
    load_row,
    load_tile,
    program_batch_head,
    slice_bases,
    store_row,
    store_tile,
)


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
    KV_HEADS: tl.constexpr,
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
        narrow_blocks_ptr, wide_blocks_ptr, VALUE_BLOCKS
    )
    batch, head = program_batch_head(KV_HEADS)
    k_base, v_base, gate_base = slice_bases(batch, head, seq_len, KV_HEADS, DIM, DIM_V)
    # Every pointer below moves to this program's (batch, key/value head).
    k_ptr += k_base
    v_ptr += v_base
    l_ptr += gate_base
    l_lo_ptr += gate_base
    state = tl.zeros([TILE_FEATURES, VALUE_BLOCK], tl.float32)  # [TILE_FEATURES, VALUE_BLOCK]
    norm = tl.zeros([TILE_FEATURES], tl.float32)  # [TILE_FEATURES]
    for chunk in range(tl.cdiv(seq_len, CHUNK)):
        tile_index = state_tile_index(batch, head, chunk, feature_tile, seq_len, KV_HEADS, CHUNK, FEATURE_TILES)
        store_state_columns(s_ptr, z_ptr, tile_index, value_block, state, norm, DIM_V, VALUE_BLOCK)
        decay = tl.exp(chunk_end_gate(l_ptr, chunk, seq_len, KV_HEADS, CHUNK))
        state = state * decay
        norm = norm * decay
        for start in range(chunk * CHUNK, (chunk + 1) * CHUNK, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            root_decay = key_root_decay(l_ptr, l_lo_ptr, cols, chunk, seq_len, KV_HEADS, CHUNK, ROOT_SCALE)
            k_narrow, k_wide = scaled_blocks(
                k_ptr, cols, narrow, wide, scale=root_decay[:, None], seq_len=seq_len, HEADS=KV_HEADS, DIM=DIM
            )
            phi = (
                tile_features(x_narrow=k_narrow, x_wide=k_wide, ROWS=BLOCK_N) * multiplicity
            )  # [BLOCK_N, TILE_FEATURES]
            v = load_columns(
                v_ptr, cols, block=value_block, seq_len=seq_len, HEADS=KV_HEADS, DIM=DIM_V, WIDTH=VALUE_BLOCK
            )  # [BLOCK_N, VALUE_BLOCK]
            # [TILE_FEATURES, BLOCK_N] @ [BLOCK_N, VALUE_BLOCK] -> [TILE_FEATURES, VALUE_BLOCK]
            state += tl.dot(tl.trans(as_input(phi, v_ptr)), v)
            norm += tl.sum(phi, axis=0)


@triton.jit
def queried_state_gradient(
    q_ptr,
    l_ptr,
    dy_ptr,
    delta_ptr,
    log_normaliser_ptr,
    batch,
    head,
    narrow,
    wide,
    value_block,
    chunk,
    seq_len,
    HEADS,
    KV_HEADS,
    DIM,
    DIM_V,
    CHUNK,
    ROOT_SCALE,
    BLOCK_M,
    VALUE_BLOCK,
):
    """What chunk m's own queries give the gradient of the state entering it, for one feature tile
    and one value column block: sum_{i in m} phi(r q_i) share_i dy_i^T [TILE_FEATURES, VALUE_BLOCK],
    and -sum_{i in m} phi(r q_i) share_i delta_i [TILE_FEATURES] for the norm, summed over the
    query heads of key/value head `head`'s group. q_ptr, dy_ptr, delta_ptr and log_normaliser_ptr
    point at their arrays' start (HEADS heads), l_ptr at the key/value head's gate."""
    d_state = tl.zeros([TILE_FEATURES, VALUE_BLOCK], tl.float32)  # [TILE_FEATURES, VALUE_BLOCK]
    d_norm = tl.zeros([TILE_FEATURES], tl.float32)  # [TILE_FEATURES]
    GROUP = HEADS // KV_HEADS
    BLOCKS = CHUNK // BLOCK_M
    # One loop over (query head, block of rows): nested loops spilled registers with triton 3.6 (bf16, groups).
    for step in range(GROUP * BLOCKS):
        q_base, y_base, row_base = slice_bases(batch, head * GROUP + step // BLOCKS, seq_len, HEADS, DIM, DIM_V)
        rows = chunk * CHUNK + (step % BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
        q_narrow, q_wide = scaled_blocks(
            q_ptr + q_base, rows, narrow, wide, scale=ROOT_SCALE, seq_len=seq_len, HEADS=HEADS, DIM=DIM
        )
        phi = tile_features(q_narrow, q_wide, ROWS=BLOCK_M)  # [BLOCK_M, TILE_FEATURES]
        share = state_shares(l_ptr, log_normaliser_ptr + row_base, rows, seq_len, HEADS, KV_HEADS)  # [BLOCK_M]
        dy = load_columns(
            dy_ptr + y_base, rows, block=value_block, seq_len=seq_len, HEADS=HEADS, DIM=DIM_V, WIDTH=VALUE_BLOCK
        )  # [BLOCK_M, VALUE_BLOCK]
        delta = load_row(delta_ptr + row_base, rows, seq_len, HEADS)  # [BLOCK_M]
        # [TILE_FEATURES, BLOCK_M] @ [BLOCK_M, VALUE_BLOCK] -> [TILE_FEATURES, VALUE_BLOCK]
        d_state += tl.dot(tl.trans(as_input(phi, dy_ptr)), as_input(dy * share[:, None], dy_ptr))
        d_norm -= tl.sum(phi * (delta * share)[:, None], axis=0)
    return d_state, d_norm


@triton.jit
def scan_backward_step(
    s_ptr,
    z_ptr,
    l_ptr,
    ds_ptr,
    dz_ptr,
    d_end_gate_ptr,
    d_state,
    d_norm,
    chunk,
    tile_index,
    value_block,
    seq_len,
    KV_HEADS,
    DIM_V,
    CHUNK,
    VALUE_BLOCK,
    VALUE_BLOCKS,
):
    """Chunk m of the scan run backwards, given d_state = dS_{m+1} (and d_norm): store it as the
    gradient of chunk m's own contribution, store this program's part of exp(E_m) <S_m, dS_{m+1}>
    (the end gate's; the norm's part in the first column block), and return exp(E_m) dS_{m+1}."""
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
    decay = tl.exp(chunk_end_gate(l_ptr, chunk, seq_len, KV_HEADS, CHUNK))
    state = tl.load(s_ptr + state_offsets(tile_index, value_block, DIM_V, WIDTH=VALUE_BLOCK))
    through_norm = tl.where(value_block == 0, tl.sum(load_norm(z_ptr, tile_index) * d_norm), 0.0)
    tl.store(d_end_gate_ptr + tile_index * VALUE_BLOCKS + value_block, decay * (tl.sum(state * d_state) + through_norm))
    return d_state * decay, d_norm * decay


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
    KV_HEADS: tl.constexpr,
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
    share_i dy_i^T (the norm likewise with -share_i delta_i; i over the group's query heads too),
    dS_{last + 1} = 0. Stores, per chunk, dS_{m+1} and the end gate's part (scan_backward_step)."""
    feature_tile, narrow, wide, _, value_block = scan_program(narrow_blocks_ptr, wide_blocks_ptr, VALUE_BLOCKS)
    batch, head = program_batch_head(KV_HEADS)
    _, _, gate_base = slice_bases(batch, head, seq_len, KV_HEADS, DIM, DIM_V)
    l_ptr += gate_base  # to this program's (batch, key/value head)
    d_state = tl.zeros([TILE_FEATURES, VALUE_BLOCK], tl.float32)  # [TILE_FEATURES, VALUE_BLOCK]
    d_norm = tl.zeros([TILE_FEATURES], tl.float32)  # [TILE_FEATURES]
    chunks = tl.cdiv(seq_len, CHUNK)
    for step in range(chunks):
        chunk = chunks - 1 - step
        tile_index = state_tile_index(batch, head, chunk, feature_tile, seq_len, KV_HEADS, CHUNK, FEATURE_TILES)
        d_state, d_norm = scan_backward_step(
            s_ptr,
            z_ptr,
            l_ptr,
            ds_ptr,
            dz_ptr,
            d_end_gate_ptr,
            d_state,
            d_norm,
            chunk,
            tile_index,
            value_block,
            seq_len,
            KV_HEADS,
            DIM_V,
            CHUNK,
            VALUE_BLOCK,
            VALUE_BLOCKS,
        )
        queried_state, queried_norm = queried_state_gradient(
            q_ptr,
            l_ptr,
            dy_ptr,
            delta_ptr,
            log_normaliser_ptr,
            batch,
            head,
            narrow,
            wide,
            value_block,
            chunk,
            seq_len,
            HEADS,
            KV_HEADS,
            DIM,
            DIM_V,
            CHUNK,
            ROOT_SCALE,
            BLOCK_M,
            VALUE_BLOCK,
        )
        d_state += queried_state
        d_norm += queried_norm


def power_state_gradient_scan(
    l_ptr,
    s_ptr,
    z_ptr,
    d_entering_s_ptr,
    d_entering_z_ptr,
    narrow_blocks_ptr,
    wide_blocks_ptr,
    ds_ptr,
    dz_ptr,
    d_end_gate_ptr,
    seq_len,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    CHUNK: tl.constexpr,
    FEATURE_TILES: tl.constexpr,
    VALUE_BLOCK: tl.constexpr,
    VALUE_BLOCKS: tl.constexpr,
):
    """power_state_scan_backward with the gradient of each entering state given (d_entering, from
    whatever queried the states) in place of the chunks' queries."""
    feature_tile, _, _, _, value_block = scan_program(narrow_blocks_ptr, wide_blocks_ptr, VALUE_BLOCKS)
    batch, head = program_batch_head(KV_HEADS)
    _, _, gate_base = slice_bases(batch, head, seq_len, KV_HEADS, DIM, DIM_V)
    l_ptr += gate_base  # to this program's (batch, key/value head)
    d_state = tl.zeros([TILE_FEATURES, VALUE_BLOCK], tl.float32)  # [TILE_FEATURES, VALUE_BLOCK]
    d_norm = tl.zeros([TILE_FEATURES], tl.float32)  # [TILE_FEATURES]
    chunks = tl.cdiv(seq_len, CHUNK)
    for step in range(chunks):
        chunk = chunks - 1 - step
        tile_index = state_tile_index(batch, head, chunk, feature_tile, seq_len, KV_HEADS, CHUNK, FEATURE_TILES)
        d_state, d_norm = scan_backward_step(
            s_ptr,
            z_ptr,
            l_ptr,
            ds_ptr,
            dz_ptr,
            d_end_gate_ptr,
            d_state,
            d_norm,
            chunk,
            tile_index,
            value_block,
            seq_len,
            KV_HEADS,
            DIM_V,
            CHUNK,
            VALUE_BLOCK,
            VALUE_BLOCKS,
        )
        d_state += tl.load(d_entering_s_ptr + state_offsets(tile_index, value_block, DIM_V, WIDTH=VALUE_BLOCK))
        d_norm += load_norm(d_entering_z_ptr, tile_index)


def power_state_query_gradients(
    q_ptr,
    l_ptr,
    dy_ptr,
    delta_ptr,
    log_normaliser_ptr,
    narrow_blocks_ptr,
    wide_blocks_ptr,
    ds_ptr,
    dz_ptr,
    seq_len,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    CHUNK: tl.constexpr,
    FEATURE_TILES: tl.constexpr,
    ROOT_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    VALUE_BLOCK: tl.constexpr,
    VALUE_BLOCKS: tl.constexpr,
):
    """The gradient of the state entering chunk tl.program_id(2) from that chunk's queries
    (queried_state_gradient), for one feature tile and one block of value columns."""
    feature_tile, narrow, wide, _, value_block = scan_program(narrow_blocks_ptr, wide_blocks_ptr, VALUE_BLOCKS)
    batch, head = program_batch_head(KV_HEADS)
    _, _, gate_base = slice_bases(batch, head, seq_len, KV_HEADS, DIM, DIM_V)
    l_ptr += gate_base  # to this program's (batch, key/value head)
    chunk = tl.program_id(2)
    d_state, d_norm = queried_state_gradient(
        q_ptr,
        l_ptr,
        dy_ptr,
        delta_ptr,
        log_normaliser_ptr,
        batch,
        head,
        narrow,
        wide,
        value_block,
        chunk,
        seq_len,
        HEADS,
        KV_HEADS,
        DIM,
        DIM_V,
        CHUNK,
        ROOT_SCALE,
        BLOCK_M,
        VALUE_BLOCK,
    )
    tile_index = state_tile_index(batch, head, chunk, feature_tile, seq_len, KV_HEADS, CHUNK, FEATURE_TILES)
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


@triton.jit
def state_key_gradients(
    k_ptr,
    v,
    ds_ptr,
    dz_ptr,
    narrow_blocks_ptr,
    wide_blocks_ptr,
    root_decay,
    cols,
    batch,
    head,
    chunk,
    seq_len,
    KV_HEADS,
    DIM,
    DIM_V,
    CHUNK,
    FEATURE_TILES,
    BLOCK_N,
):
    """dk [BLOCK_N, DIM], dv [BLOCK_N, DIM_V] and through_state [BLOCK_N] of a block of key/value
    head `head`'s keys from each key's share in the state after its chunk, c phi(x_j) v_j^T with
    x_j = r exp((E_m - L_j)/2) k_j (root_decay = r exp((E_m - L_j)/2)), given dS and dz of that share. through_state_j =
    sum c phi(x_j) . (dS v_j + dz) is what the share gives dE_m; it takes as much from L_j."""
    d_narrow_blocks = tl.zeros([BLOCK_N, DIM // NARROW, NARROW], tl.float32)  # [BLOCK_N, DIM / NARROW, NARROW]
    d_wide_blocks = tl.zeros([BLOCK_N, DIM // WIDE, WIDE], tl.float32)  # [BLOCK_N, DIM / WIDE, WIDE]
    dv = tl.zeros([BLOCK_N, DIM_V], tl.float32)  # [BLOCK_N, DIM_V]
    through_state = tl.zeros([BLOCK_N], tl.float32)  # [BLOCK_N]
    for feature_tile in range(FEATURE_TILES):
        narrow, wide, multiplicity = tile_blocks(narrow_blocks_ptr, wide_blocks_ptr, feature_tile)
        k_narrow, k_wide = scaled_blocks(
            k_ptr, cols, narrow, wide, scale=root_decay[:, None], seq_len=seq_len, HEADS=KV_HEADS, DIM=DIM
        )
        phi = tile_features(k_narrow, k_wide, ROWS=BLOCK_N) * multiplicity  # [BLOCK_N, TILE_FEATURES]
        tile_index = state_tile_index(batch, head, chunk, feature_tile, seq_len, KV_HEADS, CHUNK, FEATURE_TILES)
        d_state, d_norm = load_state(s_ptr=ds_ptr, z_ptr=dz_ptr, tile_index=tile_index, DIM_V=DIM_V)
        # [BLOCK_N, TILE_FEATURES] @ [TILE_FEATURES, DIM_V] -> [BLOCK_N, DIM_V]
        dv += tl.dot(phi.to(v.dtype), d_state)
        # [BLOCK_N, DIM_V] @ [DIM_V, TILE_FEATURES] -> [BLOCK_N, TILE_FEATURES]
        d_phi = tl.dot(v, tl.trans(d_state)) + d_norm[None, :]
        through_state += tl.sum(phi * d_phi, axis=1)
        d_narrow_blocks, d_wide_blocks = add_tile_gradient(
            d_narrow_blocks,
            d_wide_blocks,
            d_features=d_phi * multiplicity,
            x_narrow=k_narrow,
            x_wide=k_wide,
            narrow=narrow,
            wide=wide,
            ROWS=BLOCK_N,
            DIM=DIM,
        )
    d_k = joined_gradient(d_narrow_blocks, d_wide_blocks, ROWS=BLOCK_N, DIM=DIM) * root_decay[:, None]
    return d_k, dv, through_state


def power_state_backward_keys(
    k_ptr,
    v_ptr,
    l_ptr,
    l_lo_ptr,
    ds_ptr,
    dz_ptr,
    narrow_blocks_ptr,
    wide_blocks_ptr,
    dk_ptr,
    dv_ptr,
    through_state_ptr,
    seq_len,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    CHUNK: tl.constexpr,
    FEATURE_TILES: tl.constexpr,
    ROOT_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dk, dv and through_state of one key block from the keys' shares in the states after their
    chunks alone (state_key_gradients): the state stage's backward; dL_j = -through_state_j."""
    block_n = tl.program_id(0)
    batch, head = program_batch_head(KV_HEADS)
    k_base, v_base, gate_base = slice_bases(batch, head, seq_len, KV_HEADS, DIM, DIM_V)
    # Every pointer below moves to this program's (batch, key/value head).
    k_ptr += k_base
    dk_ptr += k_base
    v_ptr += v_base
    dv_ptr += v_base
    l_ptr += gate_base
    l_lo_ptr += gate_base
    through_state_ptr += gate_base
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = block_n * BLOCK_N // CHUNK
    v = load_tile(v_ptr, cols, seq_len, KV_HEADS, DIM=DIM_V)  # [BLOCK_N, DIM_V]
    root_decay = key_root_decay(l_ptr, l_lo_ptr, cols, chunk, seq_len, KV_HEADS, CHUNK, ROOT_SCALE)  # [BLOCK_N]
    dk, dv, through_state = state_key_gradients(
        k_ptr,
        v,
        ds_ptr,
        dz_ptr,
        narrow_blocks_ptr,
        wide_blocks_ptr,
        root_decay,
        cols,
        batch,
        head,
        chunk,
        seq_len,
        KV_HEADS,
        DIM,
        DIM_V,
        CHUNK,
        FEATURE_TILES,
        BLOCK_N,
    )
    store_tile(dk_ptr, cols, dk, seq_len, KV_HEADS, DIM)
    store_tile(dv_ptr, cols, dv, seq_len, KV_HEADS, DIM=DIM_V)
    store_row(through_state_ptr, cols, through_state, seq_len, KV_HEADS)
