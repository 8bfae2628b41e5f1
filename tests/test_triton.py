"""Triton kernels: run in Triton's interpreter against the float64 oracle (ops/sympow/naive.py) (on any machine:
the launcher is held to its CPU path here, so a GPU's TF32 matmuls do not meet the float32
rule), and compiled ahead of time for sm_90 (an H100) so a kernel that would not compile there
fails here. tests/test_triton_gpu.py holds the compiled kernels on a GPU to the bf16 rule.

The launcher fills every output with NaN before a run, so a tile the kernel never writes shows."""

import dataclasses
import inspect
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import attention_inputs, output_and_gradients, relative_error, within_kernel_rule

import ops.sympow.triton.launch as launcher
from ops.sympow import naive
from ops.sympow.attention_form import attention_form
from ops.sympow.chunk import chunk_states, chunked_form, split_chunks, state_scan
from ops.sympow.gate import chunk_local_gates, exact_cumulative_gate
from ops.sympow.triton.attention import (
    TRITON_DIMS,
    attention_forward,
    attention_plan,
    power_attention_backward_keys,
    power_attention_backward_queries,
    power_attention_forward,
    triton_attention,
)
from ops.sympow.triton.attention import gpu_tilings as attention_gpu_tilings
from ops.sympow.triton.chunk_kernels import (
    power_chunk_backward_keys,
    power_chunk_backward_local_keys,
    power_chunk_backward_queries,
    power_chunk_forward,
)
from ops.sympow.triton.chunked import chunked_forward, triton_chunked
from ops.sympow.triton.chunked_plan import chunk_gates, chunked_plan, gpu_tilings
from ops.sympow.triton.launch import LaunchOptions, compile_for
from ops.sympow.triton.state_kernels import (
    power_state_backward_keys,
    power_state_gradient_scan,
    power_state_query_gradients,
    power_state_scan,
    power_state_scan_backward,
)
from ops.sympow.triton.tiled_state import NARROW_BLOCK, WIDE_BLOCK, tile_tables

# An H100 gives a block at most 227 KiB of shared memory; a kernel compiled to need more fails at launch.
H100_SHARED_MEMORY = 227 * 1024
# Registers a thread may spill to local memory, in bytes: a few values held across a loop. The
# spills that cost are hundreds of bytes in an inner loop (16 x 16 feature tiles spilled 544).
SPILL_ALLOWANCE = 32
ITEMSIZE = {"fp32": 4, "bf16": 2}


# The kernels run in the interpreter here, on any machine: on a GPU, TF32 matmuls would not
# meet the float32 rule. (Through the public API they run where JAX's backend says.)
INTERPRETED = LaunchOptions(compiled=False)


@pytest.mark.parametrize(
    "seq, dim, dim_v, p, gamma",
    [
        (1, 16, 16, 2, 0.9),
        (63, 32, 32, 2, 0.999),
        (63, 16, 16, 4, 0.01),
        (100, 64, 64, 2, None),
        (100, 16, 32, 4, 0.5),
        (500, 16, 16, 2, 0.9),
        (500, 16, 16, 4, 0.01),
    ],
)
def test_attention_kernel_forward_matches_float64(seq, dim, dim_v, p, gamma):
    """The precision rule (docs/kernels.md): no worse than twice the pure-JAX chunked form in
    the same dtype. With strong gates |G| grows with seq (~3000 at 500 tokens, gamma 0.01); the
    kernels difference G in hi + lo pairs, where a float32 G lost ~1e-4 in every weight and
    failed this (docs/decisions.md)."""
    q, k, v, log_g = attention_inputs(2, seq, 2, dim, gamma=gamma, seed=seq + dim, dim_v=dim_v)
    scale = 1 / math.sqrt(dim)
    reference = naive.attention_form(q, k, v, log_g, p, scale)
    as32 = [None if a is None else a.astype(jnp.float32) for a in (q, k, v, log_g)]
    gate = exact_cumulative_gate(jnp.zeros(q.shape[:3], jnp.float32) if log_g is None else as32[3])
    y, log_normaliser = attention_forward(*as32[:3], gate, p, scale, log_g is not None, INTERPRETED)
    assert y.dtype == jnp.float32 and np.all(np.isfinite(y)) and np.all(np.isfinite(log_normaliser))
    jax_error = relative_error(chunked_form(*as32, p, scale, 64)[0], reference)
    assert relative_error(y, reference) <= 2 * jax_error


def test_attention_kernel_log_normaliser_is_log_of_the_weight_sum():
    q, k, v, log_g = attention_inputs(1, 40, 1, 16, gamma=0.8)
    q32, k32, v32, log_g32 = (a.astype(jnp.float32) for a in (q, k, v, log_g))
    _, log_normaliser = attention_forward(q32, k32, v32, exact_cumulative_gate(log_g32), 2, 0.25, True, INTERPRETED)
    G = np.cumsum(np.asarray(log_g), axis=1)[0, :, 0]
    w = (0.25 * np.asarray(q)[0, :, 0] @ np.asarray(k)[0, :, 0].T) ** 2 * np.exp(G[:, None] - G[None, :])
    expected = np.log(np.sum(np.tril(w), axis=1))
    np.testing.assert_allclose(log_normaliser[0, :, 0], expected, rtol=1e-5)


def check_output_and_gradients(kernel, plain_form, p, scale, seq, dim, gamma, seed, dim_v=None, heads=2):
    """y and its gradients in q, k, v (and log_g when gated) of a float32 kernel against the
    float64 oracle, within twice the error of the pure-JAX form in float32, or float32 round-off
    (conftest's `within_kernel_rule`)."""
    q, k, v, log_g = attention_inputs(1, seq, heads, dim, gamma=gamma, seed=seed, dim_v=dim_v)
    gated = log_g is not None
    log_g = jnp.zeros(q.shape[:3], q.dtype) if log_g is None else log_g

    oracle = lambda q, k, v, g: naive.attention_form(q, k, v, g if gated else None, p, scale)  # noqa: E731
    plain_form_gated = lambda q, k, v, g: plain_form(q, k, v, g if gated else None)  # noqa: E731
    reference = output_and_gradients(oracle, q, k, v, log_g)
    as32 = [a.astype(jnp.float32) for a in (q, k, v, log_g)]
    plain32, kernel32 = output_and_gradients(plain_form_gated, *as32), output_and_gradients(kernel, *as32)
    names = ("y", "q", "k", "v", "log_g") if gated else ("y", "q", "k", "v")
    for name, got, plain, expected in zip(names, kernel32, plain32, reference):
        assert np.all(np.isfinite(got)), name
        assert within_kernel_rule(got, plain, expected), name


@pytest.mark.parametrize(
    "seq, dim, dim_v, p, gamma",
    [(1, 16, 16, 2, 0.9), (37, 16, 16, 2, 0.01), (63, 32, 32, 4, 0.999), (50, 16, 32, 2, None), (200, 16, 16, 4, 0.01)],
)
def test_attention_kernel_gradients_match_float64(seq, dim, dim_v, p, gamma):
    scale = 1 / math.sqrt(dim)
    check_output_and_gradients(
        lambda q, k, v, g: triton_attention(q, k, v, g, p, scale, gamma is not None, INTERPRETED)[0],
        lambda q, k, v, g: chunked_form(q, k, v, g, p, scale, 64)[0],
        p,
        scale,
        seq,
        dim,
        gamma,
        seed=seq,
        dim_v=dim_v,
    )


def spilled_bytes(compiled) -> int:
    """Bytes a thread spills to local memory, from ptxas -v (Triton's own ptxas and flags) on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as directory:
        ptx = Path(directory) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        command = [
            get_ptxas(90).path,
            "-lineinfo",
            "-v",
            "--regAllocOptLevel=2",
            "--gpu-name=sm_90a",
            str(ptx),
            "-o",
            str(ptx.with_suffix(".o")),
        ]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    return int(re.search(r"(\d+) bytes spill stores", log).group(1))


def check_sm90_compile(kernel, pointers, constants, tiles):
    compiled = compile_for(kernel, pointers, constants, tiles)
    assert len(compiled.asm["cubin"]) > 0 and "sm_90" in compiled.asm["ptx"]
    assert compiled.metadata.shared <= H100_SHARED_MEMORY
    assert spilled_bytes(compiled) <= SPILL_ALLOWANCE


# Each kernel, its pointers in the inputs' dtype, and its float32 pointers.
KERNELS = {
    "forward": (power_attention_forward, ("q", "k", "v", "y"), ("g", "g_lo", "log_normaliser")),
    "backward_keys": (
        power_attention_backward_keys,
        ("q", "k", "v", "dy", "dk", "dv"),
        ("g", "g_lo", "delta", "log_normaliser", "dg"),
    ),
    "backward_queries": (
        power_attention_backward_queries,
        ("q", "k", "v", "dy", "dq"),
        ("g", "g_lo", "delta", "log_normaliser", "dg_rows"),
    ),
}


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dim, p, kv_heads", [(16, 2, 8), (32, 2, 8), (64, 2, 8), (64, 4, 8), (128, 2, 8), (64, 2, 2)])
def test_attention_kernels_compile_for_sm90(name, dtype, dim, p, kv_heads):
    """With its GPU tiling each kernel compiles for an H100, fits its shared memory and spills (next to) no
    registers; also with 8 query heads over 2 key/value heads (the keys kernel then loops over a group)."""
    kernel, data_pointers, float32_pointers = KERNELS[name]
    pointers = {f"{n}_ptr": f"*{dtype}" for n in data_pointers} | {f"{n}_ptr": "*fp32" for n in float32_pointers}
    dtype_of = jnp.dtype(jnp.bfloat16 if dtype == "bf16" else jnp.float32)
    q, k = (jax.ShapeDtypeStruct((1, 65536, heads, dim), dtype_of) for heads in (8, kv_heads))
    constants = attention_plan(q, k, k, p, 1 / math.sqrt(dim), True, LaunchOptions()).scalars
    check_sm90_compile(kernel, pointers, constants, attention_gpu_tilings(dim, ITEMSIZE[dtype])[kernel])


@pytest.mark.parametrize(
    "seq, dim, dim_v, chunk, gamma",
    [
        (1, 16, 16, 16, 0.9),
        (63, 32, 32, 32, 0.999),
        (100, 64, 64, 48, None),
        (500, 16, 16, 256, 0.5),
        (130, 32, 16, 16, 0.01),
    ],
)
def test_chunked_kernels_forward_matches_float64(seq, dim, dim_v, chunk, gamma):
    """At 500 tokens, chunk 256, gamma 0.5, |L| reaches 177 inside a chunk: the kernels must
    difference L's hi and lo parts apart, in the intra-chunk weights and in the key decays
    (with hi alone this failed by 19x: docs/decisions.md)."""
    q, k, v, log_g = attention_inputs(2, seq, 2, dim, gamma=gamma, seed=seq + dim, dim_v=dim_v)
    scale = 1 / math.sqrt(dim)
    reference = naive.attention_form(q, k, v, log_g, 2, scale)
    as32 = [None if a is None else a.astype(jnp.float32) for a in (q, k, v, log_g)]
    log_g32 = jnp.zeros(q.shape[:3], jnp.float32) if log_g is None else as32[3]
    y, log_normaliser, S, z = chunked_forward(*as32[:3], chunk_gates(log_g32, chunk), scale, chunk, INTERPRETED)
    assert y.dtype == jnp.float32 and all(np.all(np.isfinite(a)) for a in (y, log_normaliser, S, z))
    # The precision rule (docs/kernels.md), against the pure-JAX chunked form in the same dtype.
    jax_error = relative_error(chunked_form(*as32, 2, scale, chunk)[0], reference)
    assert relative_error(y, reference) <= 2 * jax_error


def tiled_features(x: np.ndarray) -> np.ndarray:
    """The kernels' phi_2 layout, vec(x_A outer x_B) per feature tile (A a narrow block, B a wide one), concatenated."""
    narrow, wide = x.reshape(-1, NARROW_BLOCK), x.reshape(-1, WIDE_BLOCK)
    return np.concatenate([np.outer(narrow[a], wide[b]).ravel() for a, b in zip(*tile_tables(x.shape[0]))])


def test_state_scan_kernel_holds_the_pure_jax_states():
    """The states entering each chunk, from the kernel (tiled layout) and from chunk.py's
    chunk_states + state_scan (exact layout), give the same phi(r x)^T S for any x."""
    dim, chunk, scale = 32, 32, 0.3
    q, k, v, log_g = attention_inputs(1, 100, 2, dim, gamma=0.8, seed=3)
    _, _, S_tiled, z_tiled = chunked_forward(
        *(a.astype(jnp.float32) for a in (q, k, v)),
        chunk_gates(log_g.astype(jnp.float32), chunk),
        scale,
        chunk,
        INTERPRETED,
    )
    L = chunk_local_gates(split_chunks(log_g, chunk))
    S, z, _ = state_scan(*chunk_states(split_chunks(k, chunk), split_chunks(v, chunk), L, 2, scale), L[0][:, :, -1])
    x = np.asarray(jax.random.normal(jax.random.key(7), (dim,), jnp.float64))
    phi = np.asarray(naive.phi(jnp.asarray(x) * math.sqrt(scale), 2))
    phi_tiled = tiled_features(x * math.sqrt(scale))
    features = len(tile_tables(dim)[0]) * NARROW_BLOCK * WIDE_BLOCK
    S_tiled = np.asarray(S_tiled, np.float64).reshape(*S_tiled.shape[:3], features, dim)
    z_tiled = np.asarray(z_tiled, np.float64).reshape(*z_tiled.shape[:3], features)
    assert relative_error(phi_tiled @ S_tiled, np.einsum("D,bmhDv->bmhv", phi, S)) < 1e-5
    assert relative_error(z_tiled @ phi_tiled, np.einsum("D,bmhD->bmh", phi, z)) < 1e-5


@pytest.mark.parametrize(
    "seq, dim, dim_v, chunk, gamma",
    [(37, 16, 16, 16, 0.01), (63, 32, 32, 32, 0.999), (100, 16, 32, 48, None), (500, 16, 16, 256, 0.5)],
)
def test_chunked_kernel_gradients_match_float64(seq, dim, dim_v, chunk, gamma):
    scale = 1 / math.sqrt(dim)
    check_output_and_gradients(
        lambda q, k, v, g: triton_chunked(q, k, v, g, scale, chunk, INTERPRETED)[0],
        lambda q, k, v, g: chunked_form(q, k, v, g, 2, scale, chunk)[0],
        2,
        scale,
        seq,
        dim,
        gamma,
        seed=seq + 1,
        dim_v=dim_v,
    )


def test_chunked_kernels_at_head_dim_128():
    """Output and gradients at head dim 128 (144 feature tiles) against float64, by the same rule;
    one head and short v, as the interpreter takes minutes for more."""
    seq, dim, chunk, scale = 40, 128, 16, 1 / math.sqrt(128)
    check_output_and_gradients(
        lambda q, k, v, g: triton_chunked(q, k, v, g, scale, chunk, INTERPRETED)[0],
        lambda q, k, v, g: chunked_form(q, k, v, g, 2, scale, chunk)[0],
        2,
        scale,
        seq,
        dim,
        0.9,
        seed=4,
        dim_v=16,
        heads=1,
    )


def test_kernels_compute_alike_with_their_gpu_tilings():
    """The tests above run 16 x 16 tiles; an H100 runs each kernel's own tiling for bf16 (128 x 64
    in the flash forward pass, 64-row tiles in the chunked kernels, 32 key rows in the backward
    passes), whose tiles differ in shape from kernel to kernel and end differently at the
    sequence's end. Here the interpreter runs those tilings (on float32 inputs) at dim 64, output
    and gradients by the rule. (float32's differ at dim 64 only in the chunked backward kernels' 32
    query rows, a square tile as above.)"""
    bf16_tilings = LaunchOptions(compiled=False, gpu_tilings=True, tiling_itemsize=2)
    seq, dim, chunk, scale = 200, 64, 128, 1 / math.sqrt(64)  # 200 tokens: a partial chunk and partial tiles
    check_output_and_gradients(
        lambda q, k, v, g: triton_chunked(q, k, v, g, scale, chunk, bf16_tilings)[0],
        lambda q, k, v, g: chunked_form(q, k, v, g, 2, scale, chunk)[0],
        2,
        scale,
        seq,
        dim,
        0.9,
        seed=2,
        heads=1,
    )
    check_output_and_gradients(  # p = 4 at dim 64: the flash kernels (its state is too large to hold)
        lambda q, k, v, g: triton_attention(q, k, v, g, 4, scale, True, bf16_tilings)[0],
        lambda q, k, v, g: attention_form(q, k, v, g, 4, scale)[0],
        4,
        scale,
        seq,
        dim,
        0.9,
        seed=4,
        heads=1,
    )


CHUNKED_KERNELS = {
    "state_scan": (power_state_scan, ("k", "v"), ("l", "l_lo", "s", "z")),
    "chunk_forward": (power_chunk_forward, ("q", "k", "v", "y"), ("l", "l_lo", "s", "z", "log_normaliser")),
    "chunk_backward_queries": (
        power_chunk_backward_queries,
        ("q", "k", "v", "dy", "dq"),
        ("l", "l_lo", "delta", "log_normaliser", "s", "z", "dl_rows"),
    ),
    "state_scan_backward": (
        power_state_scan_backward,
        ("q", "dy", "ds"),
        ("l", "delta", "log_normaliser", "s", "z", "dz", "d_end_gate"),
    ),
    "chunk_backward_keys": (
        power_chunk_backward_keys,
        ("q", "k", "v", "dy", "ds", "dk", "dv"),
        ("l", "l_lo", "delta", "log_normaliser", "dz", "dl", "through_state"),
    ),
    "state_gradient_scan": (
        power_state_gradient_scan,
        ("ds",),
        ("l", "s", "z", "d_entering_s", "d_entering_z", "dz", "d_end_gate"),
    ),
    "state_query_gradients": (power_state_query_gradients, ("q", "dy"), ("l", "delta", "log_normaliser", "ds", "dz")),
    "chunk_backward_local_keys": (
        power_chunk_backward_local_keys,
        ("q", "k", "v", "dy", "dk", "dv"),
        ("l", "l_lo", "delta", "log_normaliser", "dl"),
    ),
    "state_backward_keys": (
        power_state_backward_keys,
        ("k", "v", "ds", "dk", "dv"),
        ("l", "l_lo", "dz", "through_state"),
    ),
}


@pytest.mark.parametrize("name", CHUNKED_KERNELS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dim, kv_heads", [(dim, 8) for dim in TRITON_DIMS] + [(64, 2)])
def test_chunked_kernels_compile_for_sm90(name, dtype, dim, kv_heads):
    """With its GPU tiling each kernel compiles for an H100, fits its shared memory and spills (next to) no
    registers; also with 8 query heads over 2 key/value heads (the scans then loop over a group's queries)."""
    kernel, data_pointers, float32_pointers = CHUNKED_KERNELS[name]
    tables = {"narrow_blocks_ptr": "*i32", "wide_blocks_ptr": "*i32"}
    tables = {name: kind for name, kind in tables.items() if name in inspect.signature(kernel).parameters}
    pointers = (
        {f"{n}_ptr": f"*{dtype}" for n in data_pointers} | {f"{n}_ptr": "*fp32" for n in float32_pointers} | tables
    )
    dtype_of = jnp.dtype(jnp.bfloat16 if dtype == "bf16" else jnp.float32)
    q, k = (jax.ShapeDtypeStruct((1, 65536, heads, dim), dtype_of) for heads in (8, kv_heads))
    constants = chunked_plan(q, k, k, 1 / math.sqrt(dim), 256, LaunchOptions()).launches.scalars
    check_sm90_compile(kernel, pointers, constants, gpu_tilings(dim, ITEMSIZE[dtype])[kernel])


@pytest.mark.parametrize("seq, p", [(40, 2), (24, 4)])  # p = 2 past one chunk takes the chunked kernels
def test_impl_triton_through_the_public_api_under_jit_and_in_the_model(seq, p):
    import ops
    import sympow

    q, k, v, log_g = (a.astype(jnp.float32) for a in attention_inputs(2, seq, 2, 16, gamma=0.9))
    y = jax.jit(lambda *a: ops.sympow_attention(*a, p=p, chunk_size=16, impl="triton"))(q, k, v, log_g)
    assert y.dtype == jnp.float32
    assert relative_error(y, ops.sympow_attention(q, k, v, log_g, p=p, impl="attention")) < 1e-5
    config = sympow.ModelConfig(
        vocab_size=50, d_model=32, n_layers=1, n_heads=2, attention="conformal", p=p, chunk_size=16, impl="triton"
    )
    tokens = jax.random.randint(jax.random.key(0), (1, seq), 0, 50)
    model = sympow.Transformer(config, key=jax.random.key(1))
    reference = sympow.Transformer(dataclasses.replace(config, impl="attention"), key=jax.random.key(1))
    assert relative_error(model(tokens), reference(tokens)) < 1e-5


def test_impl_triton_rejects_chunks_that_split_its_tiles():
    import ops

    q, k, v, _ = (a.astype(jnp.float32) if a is not None else None for a in attention_inputs(1, 40, 1, 16))
    with pytest.raises(ValueError, match="chunk_size a multiple of 16"):
        ops.sympow_attention(q, k, v, chunk_size=24, impl="triton")


SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
import ops
assert jax.device_count() == 2
mesh = jax.make_mesh((2,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
keys = jax.random.split(jax.random.key(0), 4)
q, k, v = (jax.random.normal(key, (4, 40, 2, 16), jnp.float32) for key in keys[:3])
log_g = jnp.log(jax.random.uniform(keys[3], (4, 40, 2), jnp.float32, 0.5, 0.99))
inputs = [jax.device_put(a, jax.sharding.NamedSharding(mesh, P("batch"))) for a in (q, k, v, log_g)]
for impl in ("triton", "chunked"):
    attend = lambda q, k, v, g: ops.sympow_attention(q, k, v, g, chunk_size=16, impl=impl)
    sharded = jax.jit(jax.shard_map(attend, mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))
    y = sharded(*inputs)
    assert len(y.sharding.device_set) == 2
    np.testing.assert_allclose(y, attend(q, k, v, log_g), rtol=1e-5, atol=1e-6)
print("sharded ok")
"""


def test_attention_on_a_batch_sharded_over_two_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "sharded ok" in result.stdout, result.stderr[-3000:]


class FakeCudaKernels:
    """Stands in for jaxlib's CUDA-only half of jax_triton (kernel objects and their launch
    records), so that the GPU lowering runs on a CPU: every kernel goes through jax_triton's own
    Triton compile for sm_90, and each launch is recorded with its grid and shared memory."""

    def __init__(self):
        self.launches = []
        self.compiled = []  # jax_triton makes a kernel object once per compile, then caches it

    def get_compute_capability(self, device):
        return 90

    def TritonKernel(self, name, num_warps, num_ctas, shared_memory, *rest):
        self.compiled.append(name)
        return dict(name=name, num_warps=num_warps, shared_memory=shared_memory)

    def create_scalar_parameter(self, value, dtype):
        return ("scalar", value, dtype)

    def create_array_parameter(self, *args):
        return ("array", *args)

    def TritonKernelCall(self, kernel, grid_x, grid_y, grid_z, parameters):
        launches = self.launches

        class Call:
            def to_proto(self, name, metadata):
                scalars = [value for kind, value, *_ in parameters if kind == "scalar"]
                launches.append(dict(kernel, grid=(grid_x, grid_y, grid_z), scalars=scalars))
                return b"launch"

        return Call()


def test_dce_rule_is_called_as_this_jax_calls_rules():
    """jax-triton 0.4.1's two-argument DCE rule under jax 0.12's three arguments, and a rule of
    three under jax 0.11's two; a rule of this jax's own convention is used as it is."""
    eqn = type("Eqn", (), {"invars": ["a", "b"]})()
    old_rule = lambda used_outputs, eqn: ([True] * len(eqn.invars), eqn)  # noqa: E731
    new_rule = lambda used_outputs, live_inputs, eqn: (list(live_inputs), eqn)  # noqa: E731
    assert launcher.dce_rule_for_jax(old_rule, jax_passes_live_inputs=True)([True], [False, True], eqn) == (
        [True, True],
        eqn,
    )
    assert launcher.dce_rule_for_jax(new_rule, jax_passes_live_inputs=False)([True], eqn) == ([True, True], eqn)
    assert launcher.dce_rule_for_jax(old_rule, jax_passes_live_inputs=False) is old_rule
    assert launcher.dce_rule_for_jax(new_rule, jax_passes_live_inputs=True) is new_rule


@pytest.mark.parametrize("p", [2, 4])
def test_gpu_lowering_through_jax_triton(monkeypatch, p):
    """jit(grad) of impl='triton' in bf16, lowered for CUDA on a CPU through jax_triton.triton_call:
    the kernels, their constants, grids and warps as a GPU would get them (their GPU tilings), within an
    H100's shared memory; a second sequence length reuses every compiled kernel, with its length
    passed at run time. (A GPU run still has to show that they launch and what they compute.)"""
    from ops.sympow.triton.attention import attention

    fake = FakeCudaKernels()
    triton_lib = launcher.jax_triton().triton_lib  # imported as the launcher does, with triton 3.6's fix
    for name in (
        "get_compute_capability",
        "TritonKernel",
        "create_scalar_parameter",
        "create_array_parameter",
        "TritonKernelCall",
    ):
        monkeypatch.setattr(triton_lib.triton_kernel_call_lib, name, getattr(fake, name), raising=False)

    def attend(q, k, v, log_g):
        compiled = LaunchOptions(compiled=True)
        return (
            triton_chunked(q, k, v, log_g, 0.125, 128, compiled)
            if p == 2
            else attention(q, k, v, log_g, p, 0.125, compiled)
        )[0]

    def lower(seq):
        """Export jit(grad) at this length; its launches."""
        fake.launches.clear()
        gradients = jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
        q = jnp.zeros((2, seq, 4, 64), jnp.bfloat16)
        log_g = jnp.zeros((2, seq, 4), jnp.float32)
        custom_call = jax.export.DisabledSafetyCheck.custom_call(
            "triton_kernel_call_ffi"
        )  # export's check, for serialising; nothing is saved
        exported = jax.export.export(jax.jit(gradients), platforms=["cuda"], disabled_checks=[custom_call])(
            q, q, q, log_g
        )
        assert exported.mlir_module().count("stablehlo.custom_call @triton_kernel_call_ffi") == len(fake.launches)
        return list(fake.launches)

    # (grid, warps) of each kernel at 320 tokens, batch 2, 4 heads, dim 64: 40 feature tiles x 2
    # value-column blocks for the scans, 64-row tiles for the rest but the flash forward (128)
    # and the two backward keys kernels (32).
    expected = (
        {
            "power_state_scan": ((80, 8), 8),
            "power_chunk_forward": ((5, 8), 8),
            "power_chunk_backward_queries": ((5, 8), 8),
            "power_state_scan_backward": ((80, 8), 8),
            "power_chunk_backward_keys": ((10, 8), 8),
        }
        if p == 2
        else {
            "power_attention_forward": ((3, 8), 8),
            "power_attention_backward_keys": ((10, 8), 8),
            "power_attention_backward_queries": ((5, 8), 8),
        }
    )
    launches = lower(320)
    assert {launch["name"]: (launch["grid"][:2], launch["num_warps"]) for launch in launches} == expected
    assert all(launch["shared_memory"] <= H100_SHARED_MEMORY for launch in launches)
    assert all(launch["scalars"] == [320] for launch in launches)

    compiled_before = len(fake.compiled)
    launches = lower(640)
    assert len(fake.compiled) == compiled_before, f"a new length compiled {fake.compiled[compiled_before:]} again"
    assert {launch["name"] for launch in launches} == set(expected) and all(
        launch["scalars"] == [640] for launch in launches
    )


# Where scripts/setup.sh installs the lent GPU machine's triton (docs/gpu.md), beside the venv's.
LENT_GPU_TRITON = Path(__file__).parents[1] / ".venv" / "triton-3.6.0"

CHECK_WITH_LENT_GPU_TRITON = """
import sys, pytest, triton
assert triton.__version__ == "3.6.0", triton.__version__
selected = "compile_for_sm90 or gpu_lowering"
sys.exit(pytest.main([sys.argv[1], "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-k", selected]))
"""


def test_every_kernel_also_builds_with_the_lent_gpus_triton_3_6():
    """Users install triton 3.7 but the lent H100 has 3.6, whose register allocation differs
    (one tiling spilled 156 bytes with it and none with 3.7) and with which jax-triton 0.4.1
    lowers only after the launcher's TMA_TF32 fix: the sm_90 compiles and the jax-triton
    lowering above, run again with triton 3.6."""
    if not (LENT_GPU_TRITON / "triton").is_dir():
        pytest.skip(f"triton 3.6.0 is not installed in {LENT_GPU_TRITON} (scripts/setup.sh installs it)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(LENT_GPU_TRITON), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", CHECK_WITH_LENT_GPU_TRITON, __file__], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
