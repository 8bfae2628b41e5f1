"""Triton kernels: run in Triton's interpreter on a CPU against the float64 naive form, and
compiled ahead of time for sm_90 (an H100) so a kernel that would not compile there fails here.

The launcher fills every output with NaN before a run, so a tile the kernel never writes shows."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import attention_inputs, relative_error

from ops.sympow.naive import attention_form
from ops.sympow.triton.attention import attention_forward, power_attention_forward
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
    y, log_normaliser = attention_forward(*as32, p, scale)
    assert y.dtype == jnp.float32 and np.all(np.isfinite(y)) and np.all(np.isfinite(log_normaliser))
    # The precision rule of DESIGN.md section 4: no worse than twice the pure-JAX form in the same dtype.
    jax_error = relative_error(attention_form(*as32, p, scale), reference)
    assert relative_error(y, reference) <= 2 * jax_error


def test_attention_kernel_log_normaliser_is_log_of_the_weight_sum():
    q, k, v, log_g = attention_inputs(1, 40, 1, 16, gamma=0.8)
    _, log_normaliser = attention_forward(*(a.astype(jnp.float32) for a in (q, k, v, log_g)), 2, 0.25)
    G = np.cumsum(np.asarray(log_g), axis=1)[0, :, 0]
    w = (0.25 * np.asarray(q)[0, :, 0] @ np.asarray(k)[0, :, 0].T) ** 2 * np.exp(G[:, None] - G[None, :])
    expected = np.log(np.sum(np.tril(w), axis=1))
    np.testing.assert_allclose(log_normaliser[0, :, 0], expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("dim, p", [(16, 2), (32, 2), (64, 2), (64, 4)])
def test_attention_kernel_compiles_for_sm90(dtype, dim, p):
    pointers = {name: f"*{dtype}" for name in ("Q", "K", "V", "Y")} | {"G": "*fp32", "LOG_NORMALISER": "*fp32"}
    constants = dict(SEQ=65536, HEADS=8, DIM=dim, SCALE=1 / math.sqrt(dim), POWER=p, GATED=True, BLOCK_M=64, BLOCK_N=64)
    kernel = compile_for(power_attention_forward, pointers, constants)
    assert len(kernel.asm["cubin"]) > 0 and "sm_90" in kernel.asm["ptx"]
