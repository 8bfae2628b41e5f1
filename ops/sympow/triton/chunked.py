"""Gated power attention with p = 2 through the chunked kernels, as two stages: the states
entering every chunk (what each chunk adds, and the scan over chunks: one kernel,
ops.sympow.triton.state_kernels) and each chunk's outputs (ops.sympow.triton.chunk_kernels).
Each stage has a kernel backend and a pure-JAX one (ops.sympow.chunk, float32) of one signature,
forward and backward, and both pass states in the kernels' tiled layout
(ops.sympow.triton.tiled_state; the choice: docs/kernels.md). `LaunchOptions.kernel_stages`
says which stages run as kernels, so that a stage whose kernels fail on a GPU can be left to
JAX; with both, the backward pass takes the fused kernels (power_state_scan_backward and
power_chunk_backward_keys each do the work of both stages), which saves a round trip of the
per-chunk state gradients through memory.

In every backward pass L is the chunk-local gate: E_m, L at chunk m's last position, collects
what the scan's decays and the keys' shares of the state give it, and d log_g_u sums dL_t over
t >= u in u's chunk.

With grouped heads the states are per key/value head, scanned once each, and the kernels read a
key/value head's keys, values, gate and states in place for each of its query heads; what the
key-block kernels write per query head (dk, dv, dL) the host sums over the group (group_sum).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ops.sympow import chunk
from ops.sympow.chunk import split_chunks
from ops.sympow.gate import chunk_local_gates, reverse_cumsum
from ops.sympow.groups import group_sum
from ops.sympow.numerics import compute_dtype
from ops.sympow.triton.attention import check_dims, log_weight_delta
from ops.sympow.triton.chunk_kernels import (
    power_chunk_backward_keys,
    power_chunk_backward_local_keys,
    power_chunk_backward_queries,
    power_chunk_forward,
)
from ops.sympow.triton.chunked_plan import chunk_gates, chunk_multiple, chunked_plan
from ops.sympow.triton.launch import STAGES, LaunchOptions, per_query_head
from ops.sympow.triton.state_kernels import (
    power_state_backward_keys,
    power_state_gradient_scan,
    power_state_query_gradients,
    power_state_scan,
    power_state_scan_backward,
)
from ops.sympow.triton.tiled_state import exact_from_tiled, tiled_from_exact


def like(*arrays) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]


def log_gate_gradient(dL, like_log_g):
    """d log_g [batch, seq, kv_heads] from dL [batch, chunks, chunk, kv_heads] of the chunk-local gate."""
    batch, seq, kv_heads = like_log_g.shape
    return reverse_cumsum(dL, axis=2).reshape(batch, -1, kv_heads)[:, :seq].astype(like_log_g.dtype)


def end_gate_gradient(d_end_gate_parts, through_state, chunk_size: int):
    """dE_m [batch, chunks, kv_heads]: the scan's parts and the keys' shares of the state after chunk m."""
    return jnp.sum(d_end_gate_parts, axis=(3, 4)) + jnp.sum(split_chunks(through_state, chunk_size), axis=2)


# The state stage: k, v, log_g -> the tiled states S [batch, chunks, kv_heads, tiles, TILE_FEATURES, dim_v]
# and z [batch, chunks, kv_heads, tiles, TILE_FEATURES] entering each chunk.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def kernel_states(k, v, log_g, scale: float, chunk_size: int, options: LaunchOptions):
    return kernel_states_forward(k, v, log_g, scale, chunk_size, options)[0]


def kernel_states_forward(k, v, log_g, scale, chunk_size, options):
    plan = chunked_plan(k, k, v, scale, chunk_size, options)
    L = chunk_gates(log_g, chunk_size)
    S, z = plan.launches.launch(power_state_scan, [k, v, *L, *plan.tables], [plan.state, plan.norm])
    return (S, z), (k, v, log_g, L, S, z)


def kernel_states_backward(scale, chunk_size, options, saved, cotangents):
    k, v, log_g, L, S, z = saved
    plan = chunked_plan(k, k, v, scale, chunk_size, options)
    launch = plan.launches.launch
    d_added_S, d_added_z, d_end_gate_parts = launch(
        power_state_gradient_scan,
        [L[0], S, z, *(d.astype(jnp.float32) for d in cotangents), *plan.tables],
        [plan.state.update(dtype=v.dtype), plan.norm, plan.end_gate_parts],
    )
    dk, dv, through_state = launch(
        power_state_backward_keys, [k, v, *L, d_added_S, d_added_z, *plan.tables], [*like(k, v), plan.key_rows]
    )
    dL = -split_chunks(through_state, chunk_size)
    dL = dL.at[:, :, -1].add(end_gate_gradient(d_end_gate_parts, through_state, chunk_size))
    return dk, dv, log_gate_gradient(dL, log_g)


kernel_states.defvjp(kernel_states_forward, kernel_states_backward)


def jax_states(k, v, log_g, scale: float, chunk_size: int, options: LaunchOptions = None):
    """kernel_states in pure JAX: ops.sympow.chunk's chunk_states and state_scan in the compute
    dtype (float32 for bf16 or float32, as the kernels hold states), in the tiled layout."""
    k, v = (a.astype(compute_dtype(k)) for a in (k, v))
    L = chunk_local_gates(split_chunks(log_g, chunk_size))
    added = chunk.chunk_states(split_chunks(k, chunk_size), split_chunks(v, chunk_size), L, 2, scale)
    S, z, _ = chunk.state_scan(*added, L[0][:, :, -1])
    return tiled_from_exact(S, z)


# The outputs stage: q, k, v, log_g and the entering states -> y and the log-normaliser
# (log of the sum of y's weights, the state's included).


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def kernel_outputs(q, k, v, log_g, S, z, scale: float, chunk_size: int, options: LaunchOptions):
    return kernel_outputs_forward(q, k, v, log_g, S, z, scale, chunk_size, options)[0]


def kernel_outputs_forward(q, k, v, log_g, S, z, scale, chunk_size, options):
    plan = chunked_plan(q, k, v, scale, chunk_size, options)
    L = chunk_gates(log_g, chunk_size)
    outputs = plan.launches.launch(
        power_chunk_forward, [q, k, v, *L, S, z, *plan.tables], [*per_query_head(q, v), plan.rows]
    )
    return tuple(outputs), (q, k, v, log_g, L, S, z, *outputs)


def kernel_outputs_backward(scale, chunk_size, options, saved, cotangents):
    q, k, v, log_g, L, S, z, y, log_normaliser = saved
    dy, d_log_normaliser = cotangents
    plan = chunked_plan(q, k, v, scale, chunk_size, options)
    launch = plan.launches.launch
    delta = log_weight_delta(dy, y, d_log_normaliser)
    rows = [q, k, v, *L, dy, delta, log_normaliser]
    dq, dL_rows = launch(power_chunk_backward_queries, [*rows, S, z, *plan.tables], [*like(q), plan.rows])
    dS, dz = launch(
        power_state_query_gradients, [q, L[0], dy, delta, log_normaliser, *plan.tables], [plan.state, plan.norm]
    )
    dk, dv, dL_columns = launch(power_chunk_backward_local_keys, rows, [*per_query_head(q, k, v), plan.rows])
    dk, dv, dL = (group_sum(x, k.shape[2]) for x in (dk, dv, dL_rows + dL_columns))
    return dq, dk, dv, log_gate_gradient(split_chunks(dL, chunk_size), log_g), dS, dz


kernel_outputs.defvjp(kernel_outputs_forward, kernel_outputs_backward)


def jax_outputs(q, k, v, log_g, S, z, scale: float, chunk_size: int, options: LaunchOptions = None):
    """kernel_outputs in pure JAX: ops.sympow.chunk's chunk_outputs in the compute dtype, from the
    tiled states; y in v's dtype, as the kernels give it."""
    L = chunk_local_gates(split_chunks(log_g, chunk_size))
    S, z = exact_from_tiled(S, z, q.shape[-1])
    qc, kc, vc = (split_chunks(a.astype(compute_dtype(q)), chunk_size) for a in (q, k, v))
    y, log_normaliser = chunk.chunk_outputs(qc, kc, vc, L, S, z, 2, scale, with_log_normaliser=True)
    batch, seq, heads, dim_v = *q.shape[:3], v.shape[-1]
    y = y.reshape(batch, -1, heads, dim_v)[:, :seq].astype(v.dtype)
    return y, log_normaliser.reshape(batch, -1, heads)[:, :seq]


# Both stages as kernels, with the fused backward pass.


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


def chunked_forward(q, k, v, L, scale: float, chunk_size: int, options: LaunchOptions = LaunchOptions()):
    """(y, log normaliser, S, z) through the state scan and the chunk output kernel; L as (hi, lo)."""
    plan = chunked_plan(q, k, v, scale, chunk_size, options)
    S, z = plan.launches.launch(power_state_scan, [k, v, *L, *plan.tables], [plan.state, plan.norm])
    y, log_normaliser = plan.launches.launch(
        power_chunk_forward, [q, k, v, *L, S, z, *plan.tables], [*per_query_head(q, v), plan.rows]
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
    options=LaunchOptions(),
    d_log_normaliser=None,
):
    """(dq, dk, dv, dL) through the three fused backward kernels; dL [batch, chunks, chunk, kv_heads]
    is the gradient of the chunk-local gates. d_log_normaliser: a gradient in the log-normaliser
    too (see `log_weight_delta`)."""
    plan = chunked_plan(q, k, v, scale, chunk_size, options)
    launch = plan.launches.launch
    delta = log_weight_delta(dy, y, d_log_normaliser)
    rows = [q, k, v, *L, dy, delta, log_normaliser]
    dq, dL_rows = launch(power_chunk_backward_queries, [*rows, S, z, *plan.tables], [*like(q), plan.rows])
    # dS is only ever a matmul operand, so it is stored in the inputs' dtype: no extra rounding,
    # half the bytes the keys kernel reads for bf16. S stays float32 for its end gate's gradient.
    d_state, d_norm, d_end_gate_parts = launch(
        power_state_scan_backward,
        [q, L[0], dy, delta, log_normaliser, S, z, *plan.tables],
        [plan.state.update(dtype=v.dtype), plan.norm, plan.end_gate_parts],
    )
    dk, dv, dL_columns, through_state = launch(
        power_chunk_backward_keys,
        [*rows, d_state, d_norm, *plan.tables],
        [*per_query_head(q, k, v), plan.rows, plan.rows],
    )
    dk, dv, dL, through_state = (group_sum(x, k.shape[2]) for x in (dk, dv, dL_rows + dL_columns, through_state))
    dL = split_chunks(dL, chunk_size)
    return dq, dk, dv, dL.at[:, :, -1].add(end_gate_gradient(d_end_gate_parts, through_state, chunk_size))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def triton_chunked(q, k, v, log_g, scale: float, chunk_size: int, options: LaunchOptions = LaunchOptions()):
    """Both stages as kernels: y and the log of its normaliser (log sum_j w_ij), differentiable in
    q, k, v and log_g through the fused backward kernels."""
    y, log_normaliser, *_ = chunked_forward(q, k, v, chunk_gates(log_g, chunk_size), scale, chunk_size, options)
    return y, log_normaliser


def triton_chunked_forward(q, k, v, log_g, scale, chunk_size, options):
    L = chunk_gates(log_g, chunk_size)
    y, log_normaliser, S, z = chunked_forward(q, k, v, L, scale, chunk_size, options)
    return (y, log_normaliser), ChunkedResiduals(q, k, v, L, y, log_normaliser, S, z)


def triton_chunked_backward(scale, chunk_size, options, saved: ChunkedResiduals, cotangents):
    dy, d_log_normaliser = cotangents
    dq, dk, dv, dL = chunked_backward(*saved, dy, scale, chunk_size, options, d_log_normaliser)
    return dq, dk, dv, log_gate_gradient(dL, saved.L[0])


triton_chunked.defvjp(triton_chunked_forward, triton_chunked_backward)


def chunked(q, k, v, log_g, scale: float, chunk_size: int, options: LaunchOptions = LaunchOptions()):
    """Gated power attention with p = 2 through the chunked stages, those in options.kernel_stages
    as kernels (O(T c d + T D' d) work, states per chunk): (y, log normaliser). With grouped
    heads (k, v, log_g over fewer heads than q) the states are those of the key/value heads."""
    check_dims(q, v)
    multiple = chunk_multiple(q, options)
    if chunk_size % multiple:
        raise ValueError(
            f"impl='triton' needs chunk_size a multiple of {multiple} here (tiles do not straddle chunks); "
            f"got {chunk_size}"
        )
    log_g = jnp.zeros(k.shape[:3], jnp.float32) if log_g is None else log_g.astype(jnp.float32)
    if set(options.kernel_stages) == set(STAGES):
        return triton_chunked(q, k, v, log_g, scale, chunk_size, options)
    states = kernel_states if "states" in options.kernel_stages else jax_states
    outputs = kernel_outputs if "outputs" in options.kernel_stages else jax_outputs
    S, z = states(k, v, log_g, scale, chunk_size, options)
    return outputs(q, k, v, log_g, S, z, scale, chunk_size, options)
