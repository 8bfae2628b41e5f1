"""Would bf16 operands in the chunked path's state matmuls keep the bf16 precision rule (docs/kernels.md)?
Emulated on a CPU: the pure-JAX chunked form with every operand of those matmuls rounded to bf16
(phi features, v, S) and the products accumulated in float32, as the Triton kernels do with bf16
inputs; in the backward pass the matmuls' incoming gradients (dy-like and dS) rounded too.
Errors are against the float64 oracle's attention form on the unrounded inputs, like
tests/test_triton_gpu.py's rule; the ratio to the plain chunked form's error on the same bf16
inputs must stay within 2.

    .venv/bin/python benchmarks/bf16_state_operands.py     # about 2 minutes on 2 cores
"""

import math
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import attention_inputs, relative_error  # noqa: E402

from ops.sympow import chunk, naive  # noqa: E402

CASES = [
    (500, 64, 128, 0.01),
    (500, 16, 64, 0.5),
    (4097, 64, 256, 0.9),
    (2000, 64, 128, None),
    (4096, 64, 1024, 0.99),
    (4096, 64, 256, 0.999),
]


def to_bf16(x):
    return x.astype(jnp.bfloat16).astype(x.dtype)


@jax.custom_vjp
def rounded(x):
    """x rounded to bf16, and so is its gradient."""
    return to_bf16(x)


@jax.custom_vjp
def gradient_rounded(x):
    return x


rounded.defvjp(lambda x: (to_bf16(x), None), lambda _, g: (to_bf16(g),))
gradient_rounded.defvjp(lambda x: (x, None), lambda _, g: (to_bf16(g),))


def bf16_state_matmul(subscripts, features, other):
    return gradient_rounded(jnp.einsum(subscripts, rounded(features), rounded(other)))


def output_and_gradients(attend, *inputs):
    y, pullback = jax.vjp(attend, *inputs)
    return (y, *pullback(jax.grad(lambda y: jnp.sum(jnp.sin(3 * y)))(y)))


def main():
    print(
        "| seq | dim | chunk | gamma | output | plain chunked error | bf16 state operands error | ratio |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for seq, dim, chunk_size, gamma in CASES:
        q, k, v, log_g = attention_inputs(1, seq, 4, dim, gamma=gamma, seed=seq + dim)
        log_g = jnp.zeros(q.shape[:3], q.dtype) if log_g is None else log_g
        scale = 1 / math.sqrt(dim)
        reference = output_and_gradients(lambda *a, scale=scale: naive.attention_form(*a, 2, scale), q, k, v, log_g)
        inputs = [to_bf16(a.astype(jnp.float32)) for a in (q, k, v)] + [log_g.astype(jnp.float32)]
        errors = []
        for matmul in (jnp.einsum, bf16_state_matmul):
            chunked = jax.jit(partial(chunk.chunked_form, p=2, scale=scale, chunk_size=chunk_size, matmul=matmul))
            got = output_and_gradients(lambda *a, chunked=chunked: chunked(*a)[0], *inputs)
            errors.append([relative_error(a, b) for a, b in zip(got, reference)])
        for name, plain, rounded_error in zip(("y", "dq", "dk", "dv", "d log_g"), *errors):
            print(
                f"| {seq} | {dim} | {chunk_size} | {gamma} | {name} | {plain:.2e} | {rounded_error:.2e} |"
                f" {rounded_error / plain:.2f} |"
            )


if __name__ == "__main__":
    main()
