"""Flash-style gated power attention in log space: the whole op for short sequences and
for states too large to hold (p = 4 at d = 64).

Per (query block, batch x head) program, over key blocks up to the diagonal (with grouped heads,
those of the query head's key/value head, read in place; the host sums a group's gradients):
log w_ij = p log|s q_i . k_j| + G_i - G_j (j <= i), with G given as hi + lo in float32 pairs
(ops.exact) so that G_i - G_j keeps float32's relative precision when |G| is large (strong
gates over long sequences: |G| ~ 3000 at T = 500, gamma = 0.01), kept against a running row max m_i
as flash attention keeps softmax scores; y_i = sum_j w_ij v_j / max(sum_j w_ij, eps) in the
frame of the final row max. The log-normaliser m_i + log l_i is stored for the backward pass.

The tile helpers, and the conventions of both kernel families, are in ops.sympow.triton.tiles.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton.language as tl

from ops.sympow.gate import exact_cumulative_gate, reverse_cumsum
from ops.sympow.groups import group_sum
from ops.sympow.triton.launch import LaunchOptions, Plan, Tiling, per_query_head
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


def power_attention_forward(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    g_lo_ptr,
    y_ptr,
    log_normaliser_ptr,
    seq_len,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    SCALE: tl.constexpr,
    POWER: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y and the log-normaliser for one query block, over the key blocks up to its diagonal."""
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
    g_ptr += gate_base
    g_lo_ptr += gate_base
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_tile(q_ptr, rows, seq_len, HEADS, DIM)  # [BLOCK_M, DIM]
    row_hi, row_lo = load_gates(g_ptr, g_lo_ptr, rows, seq_len, KV_HEADS)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # [BLOCK_M]
    row_sum = tl.zeros([BLOCK_M], tl.float32)  # [BLOCK_M]
    acc = tl.zeros([BLOCK_M, DIM_V], tl.float32)  # [BLOCK_M, DIM_V]
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
        g_ptr,
        g_lo_ptr,
        key_start=0,
        key_end=(block_m + 1) * BLOCK_M,
        seq_len=seq_len,
        KV_HEADS=KV_HEADS,
        DIM=DIM,
        DIM_V=DIM_V,
        SCALE=SCALE,
        POWER=POWER,
        GATED=GATED,
        BLOCK_N=BLOCK_N,
    )
    store_outputs(y_ptr, log_normaliser_ptr, rows, row_max, row_sum, acc, seq_len, HEADS, DIM_V)


def power_attention_backward_keys(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    g_lo_ptr,
    dy_ptr,
    delta_ptr,
    log_normaliser_ptr,
    dk_ptr,
    dv_ptr,
    dg_ptr,
    seq_len,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    SCALE: tl.constexpr,
    POWER: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dk, dv and the column part of dG for one key block, over the query blocks at or below its
    diagonal: delta_i = dy_i . y_i, dG_j -= sum_i d log w_ij. With grouped heads the keys are the
    query head's key/value head's, and dk, dv, dG this query head's share (the host sums the
    group's: a loop over the group here spilled registers at float32, d 64)."""
    block_n = tl.program_id(0)
    batch, head, kv_head, q_base, y_base, row_base, k_base, v_base, gate_base = query_and_key_value_bases(
        seq_len, HEADS, KV_HEADS, DIM, DIM_V
    )
    # Every pointer below moves to this program's (batch, query head) or its key/value head.
    q_ptr += q_base
    dk_ptr += q_base
    dy_ptr += y_base
    dv_ptr += y_base
    delta_ptr += row_base
    log_normaliser_ptr += row_base
    dg_ptr += row_base
    k_ptr += k_base
    v_ptr += v_base
    g_ptr += gate_base
    g_lo_ptr += gate_base
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k, v, col_hi, col_lo = load_keys(k_ptr, v_ptr, g_ptr, g_lo_ptr, cols, seq_len, KV_HEADS, DIM, DIM_V)
    dk = tl.zeros([BLOCK_N, DIM], tl.float32)  # [BLOCK_N, DIM]
    dv = tl.zeros([BLOCK_N, DIM_V], tl.float32)  # [BLOCK_N, DIM_V]
    dg = tl.zeros([BLOCK_N], tl.float32)  # [BLOCK_N]
    dk, dv, dg = accumulate_key_gradients(
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
        query_start=(block_n * BLOCK_N // BLOCK_M) * BLOCK_M,
        query_end=seq_len,
        seq_len=seq_len,
        HEADS=HEADS,
        KV_HEADS=KV_HEADS,
        DIM=DIM,
        DIM_V=DIM_V,
        SCALE=SCALE,
        POWER=POWER,
        GATED=GATED,
        BLOCK_M=BLOCK_M,
    )
    store_tile(dk_ptr, cols, dk, seq_len, HEADS, DIM)
    store_tile(dv_ptr, cols, dv, seq_len, HEADS, DIM=DIM_V)
    store_row(dg_ptr, cols, dg, seq_len, HEADS)


def power_attention_backward_queries(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    g_lo_ptr,
    dy_ptr,
    delta_ptr,
    log_normaliser_ptr,
    dq_ptr,
    dg_rows_ptr,
    seq_len,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    DIM_V: tl.constexpr,
    SCALE: tl.constexpr,
    POWER: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq and the row part of dG for one query block, over the key blocks up to the diagonal:
    dq_i = sum_j d(q_i . k_j) k_j, dG_i = sum_j d log w_ij. The row part is 0 in exact arithmetic
    (y_i does not change when its weights scale alike), but with it the rounding of each P_ij
    cancels in the reverse cumulative sum that makes d log_g, instead of growing with seq."""
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
    dg_rows_ptr += row_base  # per query head: the host sums the group's
    k_ptr += k_base
    v_ptr += v_base
    g_ptr += gate_base
    g_lo_ptr += gate_base
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q, dy, delta, log_normaliser, row_hi, row_lo = load_query_gradients(
        q_ptr, dy_ptr, delta_ptr, log_normaliser_ptr, g_ptr, g_lo_ptr, rows, seq_len, HEADS, KV_HEADS, DIM, DIM_V
    )
    dq = tl.zeros([BLOCK_M, DIM], tl.float32)  # [BLOCK_M, DIM]
    dg = tl.zeros([BLOCK_M], tl.float32)  # [BLOCK_M]
    dq, dg = accumulate_query_gradients(
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
        key_start=0,
        key_end=(block_m + 1) * BLOCK_M,
        seq_len=seq_len,
        KV_HEADS=KV_HEADS,
        DIM=DIM,
        DIM_V=DIM_V,
        SCALE=SCALE,
        POWER=POWER,
        GATED=GATED,
        BLOCK_N=BLOCK_N,
    )
    store_tile(dq_ptr, rows, dq, seq_len, HEADS, DIM)
    store_row(dg_rows_ptr, rows, dg, seq_len, HEADS)


def gpu_tilings(dim: int, itemsize: int) -> dict:
    """Each kernel's GPU tiling (launch.Tiling) for q and k rows of dim elements of itemsize
    bytes. Compiled for sm_90 at head dims 16..128, p = 2 and 4, bf16 and float32, ptxas spills
    no registers with these, with triton 3.6 (the lent GPU's), 3.7 and 3.9. The forward pass
    takes 128 query rows a program, as flash attention does on an H100, but 64 for 512-byte rows
    (float32 at dim 128), whose tiles would not fit in shared memory; the backward passes take 32
    rows of keys a tile, and 32 rows of queries for 512-byte rows (the spills that ruled out
    larger tiles: docs/decisions.md; with triton 3.9 the queries kernel spilled 112 bytes at 64)."""
    wide_rows = dim * itemsize > 256
    return {
        power_attention_forward: Tiling(64 if wide_rows else 128, 64, num_warps=8),
        power_attention_backward_keys: Tiling(32 if wide_rows else 64, 32, num_warps=8),
        power_attention_backward_queries: Tiling(32 if wide_rows else 64, 32, num_warps=8),
    }


def attention_plan(q, k, v, p: int, scale: float, gated: bool, options: LaunchOptions) -> Plan:
    """The three kernels' launches for this problem: a program per block of query rows (per
    block of key rows for the backward keys kernel) and per batch x query head."""
    batch, seq, heads, dim = q.shape
    tilings = options.tilings(gpu_tilings, dim, q.dtype.itemsize)
    row_blocks = {
        power_attention_forward: tilings[power_attention_forward].query_rows,
        power_attention_backward_keys: tilings[power_attention_backward_keys].key_rows,
        power_attention_backward_queries: tilings[power_attention_backward_queries].query_rows,
    }
    grids = {kernel: (math.ceil(seq / rows), batch * heads) for kernel, rows in row_blocks.items()}
    scalars = dict(seq_len=seq, HEADS=heads, KV_HEADS=k.shape[2], DIM=dim, DIM_V=v.shape[-1])
    scalars |= dict(SCALE=scale, POWER=p, GATED=gated)
    return Plan(options.runs_compiled(), tilings, grids, scalars)


def attention_forward(q, k, v, gate, p: int, scale: float, gated: bool, options: LaunchOptions = LaunchOptions()):
    """(y, log normaliser) through the forward kernel; gate is the cumulative gate G as (hi, lo)."""
    plan = attention_plan(q, k, v, p, scale, gated, options)
    out_shapes = [*per_query_head(q, v), jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)]
    return plan.launch(power_attention_forward, [q, k, v, *gate], out_shapes)


def log_weight_delta(dy, y, d_log_normaliser=None):
    """delta_i in the backward kernels' d log w_ij = P_ij (dy_i . v_j - delta_i), P_ij = w_ij / sum_j w_ij.
    For a loss of y alone delta_i = dy_i . y_i; a gradient c_i in the log-normaliser log sum_j w_ij
    adds c_i P_ij, so it enters as delta_i - c_i."""
    delta = jnp.sum(dy.astype(jnp.float32) * y.astype(jnp.float32), axis=-1)
    return delta if d_log_normaliser is None else delta - d_log_normaliser


def attention_backward(
    q,
    k,
    v,
    gate,
    y,
    log_normaliser,
    dy,
    p: int,
    scale: float,
    gated: bool,
    options: LaunchOptions = LaunchOptions(),
    d_log_normaliser=None,
):
    """(dq, dk, dv, dG) through the two backward kernels; d_log_normaliser as in `log_weight_delta`."""
    plan = attention_plan(q, k, v, p, scale, gated, options)
    inputs = [q, k, v, *gate, dy, log_weight_delta(dy, y, d_log_normaliser), log_normaliser]
    rows = jax.ShapeDtypeStruct(log_normaliser.shape, jnp.float32)
    dk, dv, dgate_columns = plan.launch(power_attention_backward_keys, inputs, [*per_query_head(q, k, v), rows])
    dq, dgate_rows = plan.launch(
        power_attention_backward_queries, inputs, [jax.ShapeDtypeStruct(q.shape, q.dtype), rows]
    )
    kv_heads = k.shape[2]
    dk, dv, dgate = (group_sum(x, kv_heads) for x in (dk, dv, dgate_rows + dgate_columns))
    return dq, dk, dv, dgate


class AttentionResiduals(NamedTuple):
    """What the forward pass keeps for the backward pass."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    gate: tuple[jax.Array, jax.Array]
    y: jax.Array
    log_normaliser: jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def triton_attention(q, k, v, log_g, p: int, scale: float, gated: bool, options: LaunchOptions = LaunchOptions()):
    """Gated power attention through the Triton kernels: y and the log of its normaliser
    (log sum_j w_ij, +inf where a row has no weight), differentiable in q, k, v and log_g."""
    y, log_normaliser = attention_forward(q, k, v, exact_cumulative_gate(log_g), p, scale, gated, options)
    return y, log_normaliser  # a tuple, as the forward rule's (launch gives a list)


def triton_attention_forward(q, k, v, log_g, p, scale, gated, options):
    gate = exact_cumulative_gate(log_g)
    y, log_normaliser = attention_forward(q, k, v, gate, p, scale, gated, options)
    return (y, log_normaliser), AttentionResiduals(q, k, v, gate, y, log_normaliser)


def triton_attention_backward(p, scale, gated, options, saved: AttentionResiduals, cotangents):
    dy, d_log_normaliser = cotangents
    dq, dk, dv, dgate = attention_backward(*saved, dy, p, scale, gated, options, d_log_normaliser)
    d_log_g = reverse_cumsum(dgate, axis=1).astype(saved.gate[0].dtype)
    return dq, dk, dv, d_log_g


triton_attention.defvjp(triton_attention_forward, triton_attention_backward)


TRITON_DIMS = (16, 32, 64, 128)


def check_dims(q, v) -> None:
    """Head dims the kernels' tiles take, and batch entries small enough for their int32 offsets."""
    if q.shape[-1] not in TRITON_DIMS or v.shape[-1] not in TRITON_DIMS:
        raise ValueError(
            f"impl='triton' needs head dims of q, k and of v in {TRITON_DIMS}; got {q.shape[-1]} and {v.shape[-1]}"
        )
    _, seq, heads, _ = q.shape
    entry = seq * heads * max(q.shape[-1], v.shape[-1])
    if entry >= 2**31:
        raise ValueError(
            "impl='triton' indexes within one batch entry in int32; "
            f"seq x heads x dim = {entry} elements is 2^31 or more"
        )


def attention(q, k, v, log_g, p: int, scale: float, options: LaunchOptions = LaunchOptions()):
    """The whole op through the flash-style kernels (O(T^2 d) work, O(T d) memory): (y, log normaliser)."""
    check_dims(q, v)
    gated = log_g is not None
    log_g = log_g if gated else jnp.zeros(k.shape[:3], jnp.float32)
    return triton_attention(q, k, v, log_g.astype(jnp.float32), p, scale, gated, options)
