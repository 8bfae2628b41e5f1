"""How the chunked kernels launch for one problem: each kernel's GPU tiling, its grid, the
scalars, and the shapes of the states the stages pass between them (ops.sympow.triton.launch)."""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ops.sympow.chunk import split_chunks
from ops.sympow.gate import chunk_local_gates
from ops.sympow.triton.chunk_kernels import (
    power_chunk_backward_keys,
    power_chunk_backward_local_keys,
    power_chunk_backward_queries,
    power_chunk_forward,
)
from ops.sympow.triton.launch import LaunchOptions, Plan, Tiling
from ops.sympow.triton.state_kernels import (
    power_state_backward_keys,
    power_state_gradient_scan,
    power_state_query_gradients,
    power_state_scan,
    power_state_scan_backward,
)
from ops.sympow.triton.tiled_state import TILE_FEATURES, tile_tables

# Programs per batch x key/value head: the scans, and the state stage's key blocks.
SCANS = (power_state_scan, power_state_scan_backward, power_state_gradient_scan)
STATE_KEY_BLOCKS = (power_state_backward_keys,)
# Programs per batch x query head.
QUERY_BLOCKS = (power_chunk_forward, power_chunk_backward_queries)
KEY_BLOCKS = (power_chunk_backward_keys, power_chunk_backward_local_keys)


def gpu_tilings(dim: int, itemsize: int) -> dict:
    """Each kernel's GPU tiling for q and k rows of dim elements of itemsize bytes: 64 rows and
    8 warps. The backward key-block kernels and backward_queries take 32 rows of keys a tile, 32
    rows of queries too unless bf16 at dim <= 64, and 3 pipeline stages for bf16, 2 for float32.
    Compiled for sm_90 at dims 16..128 as jax-triton compiles them (tests/test_triton.py), ptxas
    spills at most a few bytes a thread with these and none in the scans, the forward kernel and
    anything at dim 64 in bf16 (the figures, per Triton version: docs/decisions.md). Chosen to
    compile, not yet timed: tools.tune times them against larger tiles and other stages."""
    bf16 = itemsize == 2
    backward = Tiling(64 if bf16 and dim <= 64 else 32, 32, num_warps=8, num_stages=3 if bf16 else 2)
    rows_of_64 = Tiling(64, 64, num_warps=8)
    return {
        power_state_scan: rows_of_64,
        power_chunk_forward: rows_of_64,
        power_chunk_backward_queries: backward,
        power_state_scan_backward: rows_of_64,
        power_state_gradient_scan: rows_of_64,
        power_state_query_gradients: rows_of_64,
        power_chunk_backward_keys: backward,
        power_chunk_backward_local_keys: backward,
        power_state_backward_keys: backward,
    }


def chunk_multiple(q, options: LaunchOptions) -> int:
    """chunk_size must be a multiple of every tile's rows, so that no tile straddles two chunks."""
    tilings = options.tilings(gpu_tilings, q.shape[-1], q.dtype.itemsize)
    return max(max(t.query_rows, t.key_rows) for t in tilings.values())


class ChunkedPlan(NamedTuple):
    """The kernels' launches for one problem, with the shapes of the per-chunk states they pass
    between them and the feature tile tables."""

    launches: Plan
    state: jax.ShapeDtypeStruct  # [batch, chunks, kv_heads, feature tiles, TILE_FEATURES, dim_v]
    norm: jax.ShapeDtypeStruct  # [batch, chunks, kv_heads, feature tiles, TILE_FEATURES]
    rows: jax.ShapeDtypeStruct  # [batch, seq, heads]: per query row
    key_rows: jax.ShapeDtypeStruct  # [batch, seq, kv_heads]: per key row
    end_gate_parts: jax.ShapeDtypeStruct  # [batch, chunks, kv_heads, feature tiles, value column blocks]
    tables: list[jax.Array]


def chunked_plan(q, k, v, scale: float, chunk_size: int, options: LaunchOptions) -> ChunkedPlan:
    """Programs per block of query (or key) rows and per batch x query head; the scans' per feature
    tile x block of value columns and per batch x key/value head (and per chunk, for the query
    gradients of the entering states), as are the state stage's key blocks. The kernels count
    chunks from seq_len. (The state stage alone passes k for q.)"""
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    dim_v = v.shape[-1]
    tilings = options.tilings(gpu_tilings, dim, q.dtype.itemsize)
    tables = tile_tables(dim)
    value_block = min(dim_v, options.scan_value_columns)
    scalars = dict(
        seq_len=seq,
        HEADS=heads,
        KV_HEADS=kv_heads,
        DIM=dim,
        DIM_V=dim_v,
        CHUNK=chunk_size,
        FEATURE_TILES=len(tables[0]),
        SCALE=scale,
        ROOT_SCALE=math.sqrt(scale),
        VALUE_BLOCK=value_block,
        VALUE_BLOCKS=dim_v // value_block,
    )
    chunks = math.ceil(seq / chunk_size)
    scan_grid = (len(tables[0]) * scalars["VALUE_BLOCKS"], batch * kv_heads)
    grids = dict.fromkeys(SCANS, scan_grid) | {power_state_query_gradients: (*scan_grid, chunks)}
    grids |= {kernel: (math.ceil(seq / tilings[kernel].query_rows), batch * heads) for kernel in QUERY_BLOCKS}
    grids |= {kernel: (math.ceil(seq / tilings[kernel].key_rows), batch * heads) for kernel in KEY_BLOCKS}
    grids |= {kernel: (math.ceil(seq / tilings[kernel].key_rows), batch * kv_heads) for kernel in STATE_KEY_BLOCKS}
    state = jax.ShapeDtypeStruct((batch, chunks, kv_heads, len(tables[0]), TILE_FEATURES.value, dim_v), jnp.float32)
    return ChunkedPlan(
        launches=Plan(options.runs_compiled(), tilings, grids, scalars),
        state=state,
        norm=jax.ShapeDtypeStruct(state.shape[:-1], jnp.float32),
        rows=jax.ShapeDtypeStruct((batch, seq, heads), jnp.float32),
        key_rows=jax.ShapeDtypeStruct((batch, seq, kv_heads), jnp.float32),
        end_gate_parts=jax.ShapeDtypeStruct((*state.shape[:4], scalars["VALUE_BLOCKS"]), jnp.float32),
        tables=[jnp.asarray(t) for t in tables],
    )


def chunk_gates(log_g, chunk_size: int):
    """L: the cumulative gate restarted at each chunk, [batch, seq, kv_heads], as a pair (hi, lo) of
    float32. Differences of L (intra-chunk weights, key decays to the chunk end) take both
    parts, as the flash kernels do; decays from the chunk's start, exp(E_m) and exp(L_i), take
    hi, as ops.sympow.chunk does."""
    L = chunk_local_gates(split_chunks(log_g, chunk_size))
    return tuple(part.reshape(log_g.shape[0], -1, log_g.shape[2])[:, : log_g.shape[1]] for part in L)
