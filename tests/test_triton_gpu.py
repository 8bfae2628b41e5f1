"""The Triton kernels compiled and launched on a GPU: the bf16 precision rule (docs/kernels.md) for the
output and all four gradients, longer sequences, and memory that grows linearly with seq.

Skipped on a CPU, with the reason printed (-ra): the interpreter runs float32 only, so CI checks
the same kernels in tests/test_triton.py and their sm_90 compiles; these need the lent GPU."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import attention_inputs, output_and_gradients, relative_error, sine_loss

import ops
from ops.sympow.naive import attention_form

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs a GPU: compiled Triton kernels and bf16 (the CPU interpreter runs float32 only)",
)


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize(
    "seq, dim, chunk, gamma",
    [
        (1, 16, 64, 0.9),
        (63, 32, 64, 0.999),
        (500, 64, 128, 0.01),
        (500, 16, 64, 0.5),
        (4097, 64, 256, 0.9),
        (2000, 64, 128, None),
    ],
)
def test_bf16_precision_rule(seq, dim, chunk, gamma, p):
    """Each of y, dq, dk, dv, d log_g in bf16 is within twice the error of the pure-JAX chunked
    form given the same bf16 inputs, both against float64."""
    q, k, v, log_g = attention_inputs(1, seq, 4, dim, gamma=gamma, seed=seq + dim)
    log_g = jnp.zeros(q.shape[:3], q.dtype) if log_g is None else log_g
    scale = 1 / math.sqrt(dim)
    reference = output_and_gradients(lambda q, k, v, g: attention_form(q, k, v, g, p, scale), q, k, v, log_g)
    as_bf16 = [a.astype(jnp.bfloat16) for a in (q, k, v)] + [log_g.astype(jnp.float32)]
    got, plain = (
        output_and_gradients(
            jax.jit(lambda q, k, v, g, impl=impl: ops.sympow_attention(q, k, v, g, p=p, chunk_size=chunk, impl=impl)),
            *as_bf16,
        )
        for impl in ("triton", "chunked" if p == 2 else "attention")
    )
    for name, a, b, expected in zip(("y", "q", "k", "v", "log_g"), got, plain, reference):
        assert np.all(np.isfinite(np.asarray(a, np.float32))), name
        assert relative_error(a, expected) <= 2 * relative_error(b, expected), name


@pytest.mark.parametrize("seq", [16384, 65536])
def test_long_sequences_match_the_pure_jax_chunked_form(seq):
    """float32 at lengths the interpreter cannot reach; TF32 matmuls set the tolerance."""
    q, k, v, log_g = (None if a is None else a.astype(jnp.float32) for a in attention_inputs(1, seq, 2, 64, gamma=0.99))
    kernel, plain = (
        output_and_gradients(
            jax.jit(lambda q, k, v, g, impl=impl: ops.sympow_attention(q, k, v, g, chunk_size=256, impl=impl)),
            q,
            k,
            v,
            log_g,
        )
        for impl in ("triton", "chunked")
    )
    for name, a, b in zip(("y", "q", "k", "v", "log_g"), kernel, plain):
        assert relative_error(a, b) < 1e-2, name


def compiled_bytes(seq: int) -> int:
    """Temporary plus output bytes of the compiled forward + backward at this length."""
    q, k, v, log_g = (a.astype(jnp.bfloat16) for a in attention_inputs(1, seq, 8, 64, gamma=0.99, dtype=jnp.float32))
    grad = jax.jit(
        jax.grad(lambda *a: sine_loss(ops.sympow_attention(*a, chunk_size=256, impl="triton")), argnums=(0, 1, 2, 3))
    )
    memory = grad.lower(q, k, v, log_g.astype(jnp.float32)).compile().memory_analysis()
    return memory.temp_size_in_bytes + memory.output_size_in_bytes


def test_memory_grows_linearly_with_seq():
    small, large = compiled_bytes(16384), compiled_bytes(65536)
    assert large <= 4.4 * small, (small, large)  # 4x the tokens; a T x D or T x T tensor would be far more
