"""Flash-style gated power attention in log space: the whole op for short sequences and
for states too large to hold (p = 4 at d = 64).

Per (query block, batch x head) program, over key blocks up to the diagonal:
log w_ij = p log|s q_i . k_j| + G_i - G_j (j <= i), kept against a running row max m_i
as flash attention keeps softmax scores; y_i = sum_j w_ij v_j / max(sum_j w_ij, eps) in the
frame of the final row max. The log-normaliser m_i + log l_i is stored for the backward pass."""

import math

import jax
import jax.numpy as jnp
import triton.language as tl

from ops.sympow.naive import cumulative_gate
from ops.sympow.triton.launch import launch

EPS = tl.constexpr(1e-6)  # as ops.sympow.naive.EPS; a kernel reads only constexpr globals


def power_attention_forward(
    Q, K, V, G, Y, LOG_NORMALISER,
    SEQ: tl.constexpr, HEADS: tl.constexpr, DIM: tl.constexpr, SCALE: tl.constexpr, POWER: tl.constexpr,
    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = batch_head // HEADS, batch_head % HEADS
    # q, k, v, y are [batch, seq, heads, dim] and G is [batch, seq, heads], all contiguous.
    row_stride = HEADS * DIM
    qkv_base = batch * SEQ * row_stride + head * DIM
    gate_base = batch * SEQ * HEADS + head

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, DIM)
    row_ok = rows < SEQ
    q = tl.load(Q + qkv_base + rows[:, None] * row_stride + dims[None, :], mask=row_ok[:, None], other=0.0)
    gate_rows = tl.load(G + gate_base + rows * HEADS, mask=row_ok, other=0.0)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM], tl.float32)
    for start in range(0, (block_m + 1) * BLOCK_M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < SEQ
        k = tl.load(K + qkv_base + cols[:, None] * row_stride + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + qkv_base + cols[:, None] * row_stride + dims[None, :], mask=col_ok[:, None], other=0.0)
        log_w = POWER * tl.log(tl.abs(tl.dot(q, tl.trans(k)) * SCALE))
        if GATED:
            gate_cols = tl.load(G + gate_base + cols * HEADS, mask=col_ok, other=0.0)
            log_w += gate_rows[:, None] - gate_cols[None, :]
        log_w = tl.where((rows[:, None] >= cols[None, :]) & col_ok[None, :], log_w, float("-inf"))

        new_max = tl.maximum(row_max, tl.max(log_w, axis=1))
        frame = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with no weight yet stays at 0
        w = tl.exp(log_w - frame[:, None])
        rescale = tl.exp(row_max - frame)
        row_sum = row_sum * rescale + tl.sum(w, axis=1)
        acc = acc * rescale[:, None] + tl.dot(w.to(v.dtype), v)
        row_max = new_max

    y = acc / tl.maximum(row_sum, EPS)[:, None]
    tl.store(Y + qkv_base + rows[:, None] * row_stride + dims[None, :], y, mask=row_ok[:, None])
    tl.store(LOG_NORMALISER + gate_base + rows * HEADS, row_max + tl.log(row_sum), mask=row_ok)


def attention_forward(q, k, v, log_g, p: int, scale: float, block_m: int = 16, block_n: int = 16):
    """(y, log normaliser) of gated power attention through the kernel; q, k, v [batch, seq, heads, dim]."""
    batch, seq, heads, dim = q.shape
    gated = log_g is not None
    gate = cumulative_gate(log_g).astype(jnp.float32) if gated else jnp.zeros((batch, seq, heads), jnp.float32)
    out_shapes = [jax.ShapeDtypeStruct(q.shape, v.dtype), jax.ShapeDtypeStruct((batch, seq, heads), jnp.float32)]
    grid = (math.ceil(seq / block_m), batch * heads)
    return launch(
        power_attention_forward, grid, [q, k, v, gate], out_shapes,
        SEQ=seq, HEADS=heads, DIM=dim, SCALE=scale, POWER=p, GATED=gated, BLOCK_M=block_m, BLOCK_N=block_n,
    )
