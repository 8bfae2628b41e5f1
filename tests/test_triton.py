"""Triton kernels: run in Triton's interpreter on a CPU against the float64 naive form, and
compiled ahead of time for sm_90 (an H100) so a kernel that would not compile there fails here.

The launcher fills every output with NaN before a run, so a tile the kernel never writes shows."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import attention_inputs, relative_error

from ops.sympow.naive import attention_form, cumulative_gate
from ops.sympow.triton.attention import (
    attention_forward,
    power_attention_backward_keys,
    power_attention_backward_queries,
    power_attention_forward,
    triton_attention,
)
from ops.sympow.triton.launch import compile_for


@pytest.mark.parametrize(
    "seq, dim, p, gamma",
    [(1, 16, 2, 0.9), (63, 32, 2, 0.999), (63, 16, 4, 0.01), (100, 64, 2, None), (100, 16, 4, 0.5), (500, 16, 2, 0.9)],
)
def test_attention_kernel_forward_matches_float64(seq, dim, p, gamma):
    q, k, v, log_g = attention_inputs(2, seq, 2, dim, gamma=gamma, seed=seq + dim)
    scale = 1 / math.sqrt(dim)
    reference = attention_form(q, k, v, log_g, p, scale)
    as32 = [None if a is None else a.astype(jnp.float32) for a in (q, k, v, log_g)]
    gate = jnp.zeros(q.shape[:3], jnp.float32) if log_g is None else cumulative_gate(as32[3])
    y, log_normaliser = attention_forward(*as32[:3], gate, p, scale, gated=log_g is not None)
    assert y.dtype == jnp.float32 and np.all(np.isfinite(y)) and np.all(np.isfinite(log_normaliser))
    # The precision rule of DESIGN.md section 4: no worse than twice the pure-JAX form in the same dtype.
    jax_error = relative_error(attention_form(*as32, p, scale), reference)
    assert relative_error(y, reference) <= 2 * jax_error


def test_attention_kernel_log_normaliser_is_log_of_the_weight_sum():
    q, k, v, log_g = attention_inputs(1, 40, 1, 16, gamma=0.8)
    q32, k32, v32, log_g32 = (a.astype(jnp.float32) for a in (q, k, v, log_g))
    _, log_normaliser = attention_forward(q32, k32, v32, cumulative_gate(log_g32), 2, 0.25, gated=True)
    G = np.cumsum(np.asarray(log_g), axis=1)[0, :, 0]
    w = (0.25 * np.asarray(q)[0, :, 0] @ np.asarray(k)[0, :, 0].T) ** 2 * np.exp(G[:, None] - G[None, :])
    expected = np.log(np.sum(np.tril(w), axis=1))
    np.testing.assert_allclose(log_normaliser[0, :, 0], expected, rtol=1e-5)


@pytest.mark.parametrize(
    "seq, dim, p, gamma", [(1, 16, 2, 0.9), (37, 16, 2, 0.01), (63, 32, 4, 0.999), (50, 16, 2, None)]
)
def test_attention_kernel_gradients_match_float64(seq, dim, p, gamma):
    q, k, v, log_g = attention_inputs(1, seq, 2, dim, gamma=gamma, seed=seq)
    gated = log_g is not None
    log_g = jnp.zeros(q.shape[:3], q.dtype) if log_g is None else log_g
    scale = 1 / math.sqrt(dim)

    def loss(attend, *args):
        return jnp.sum(jnp.sin(3 * attend(*args)))

    naive = lambda q, k, v, g: attention_form(q, k, v, g if gated else None, p, scale)  # noqa: E731
    kernel = lambda q, k, v, g: triton_attention(q, k, v, g, p, scale, gated)  # noqa: E731
    reference = jax.grad(lambda *a: loss(naive, *a), argnums=(0, 1, 2, 3))(q, k, v, log_g)
    as32 = [a.astype(jnp.float32) for a in (q, k, v, log_g)]
    plain32 = jax.grad(lambda *a: loss(naive, *a), argnums=(0, 1, 2, 3))(*as32)
    kernel32 = jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2, 3))(*as32)
    names = ("q", "k", "v", "log_g") if gated else ("q", "k", "v")
    for name, got, plain, expected in zip(names, kernel32, plain32, reference):
        assert np.all(np.isfinite(got)), name
        # Twice the pure-JAX float32 error, floored at float32 round-off for gradients that are ~0.
        assert relative_error(got, expected) <= max(2 * relative_error(plain, expected), 1e-6), name


KERNELS = {
    "forward": (power_attention_forward, ("Q", "K", "V", "Y"), ("G", "LOG_NORMALISER")),
    "backward_keys": (power_attention_backward_keys, ("Q", "K", "V", "DY", "DK", "DV"), ("G", "DELTA", "LOG_NORMALISER", "DG")),
    "backward_queries": (power_attention_backward_queries, ("Q", "K", "V", "DY", "DQ"), ("G", "DELTA", "LOG_NORMALISER")),
}


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dim, p", [(16, 2), (32, 2), (64, 2), (64, 4)])
def test_attention_kernels_compile_for_sm90(name, dtype, dim, p):
    kernel, data_pointers, float32_pointers = KERNELS[name]
    pointers = {n: f"*{dtype}" for n in data_pointers} | {n: "*fp32" for n in float32_pointers}
    constants = dict(SEQ=65536, HEADS=8, DIM=dim, SCALE=1 / math.sqrt(dim), POWER=p, GATED=True, BLOCK_M=64, BLOCK_N=64)
    compiled = compile_for(kernel, pointers, constants)
    assert len(compiled.asm["cubin"]) > 0 and "sm_90" in compiled.asm["ptx"]


def test_impl_triton_through_the_public_api_under_jit_and_in_the_model():
    import ops
    import sympow

    q, k, v, log_g = (a.astype(jnp.float32) for a in attention_inputs(2, 40, 2, 16, gamma=0.9))
    y = jax.jit(lambda *a: ops.sympow_attention(*a, impl="triton"))(q, k, v, log_g)
    assert y.dtype == jnp.float32
    assert relative_error(y, ops.sympow_attention(q, k, v, log_g, impl="attention")) < 1e-5
    config = sympow.ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, attention="conformal", impl="triton")
    tokens = jax.random.randint(jax.random.key(0), (1, 24), 0, 50)
    model = sympow.Transformer(config, key=jax.random.key(1))
    reference = sympow.Transformer(dataclasses.replace(config, impl="attention"), key=jax.random.key(1))
    assert relative_error(model(tokens), reference(tokens)) < 1e-5


SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
import ops
assert jax.device_count() == 2
mesh = jax.make_mesh((2,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
keys = jax.random.split(jax.random.key(0), 4)
q, k, v = (jax.random.normal(key, (4, 24, 2, 16), jnp.float32) for key in keys[:3])
log_g = jnp.log(jax.random.uniform(keys[3], (4, 24, 2), jnp.float32, 0.5, 0.99))
inputs = [jax.device_put(a, jax.sharding.NamedSharding(mesh, P("batch"))) for a in (q, k, v, log_g)]
for impl in ("triton", "chunked"):
    attend = lambda q, k, v, g: ops.sympow_attention(q, k, v, g, chunk_size=8, impl=impl)
    sharded = jax.jit(jax.shard_map(attend, mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))
    y = sharded(*inputs)
    assert len(y.sharding.device_set) == 2
    np.testing.assert_allclose(y, attend(q, k, v, log_g), rtol=1e-5, atol=1e-6)
print("sharded ok")
"""


def test_attention_on_a_batch_sharded_over_two_devices():
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "sharded ok" in result.stdout, result.stderr[-3000:]
