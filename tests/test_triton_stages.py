"""The chunked kernels stage by stage, in Triton's interpreter: the state stage (what each chunk
adds, and the scan) and the outputs stage, each as kernels and in pure JAX, against the same
stage of the float64 oracle (ops/sympow/naive.py), output and gradients; the maps between the
kernels' tiled layout and the exact one; and every mix of kernel and pure-JAX stages against
the all-kernel path, so that a stage whose kernels fail on a GPU can be left out."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FLOAT32_ROUNDOFF, attention_inputs, output_and_gradients, relative_error, within_kernel_rule

from ops.sympow import naive
from ops.sympow.embedding import symmetric_power_embedding
from ops.sympow.triton import chunked
from ops.sympow.triton.launch import LaunchOptions
from ops.sympow.triton.tiled_state import NARROW_BLOCK, WIDE_BLOCK, exact_from_tiled, tile_tables, tiled_from_exact

CHUNK, SCALE = 16, 0.25  # 16: the interpreter's tile rows
INTERPRETED = LaunchOptions(compiled=False)


def inputs(gamma, seq=3 * CHUNK, dim=16, dim_v=16, seed=0, heads=2, kv_heads=2):
    """q over `heads` heads; k, v and log_g over the first kv_heads of them (grouped when fewer)."""
    q, k, v, log_g = attention_inputs(1, seq, heads, dim, gamma=gamma, seed=seed, dim_v=dim_v)
    log_g = jnp.zeros(q.shape[:3]) if log_g is None else log_g
    return q, *(a[:, :, :kv_heads] for a in (k, v, log_g))


def assert_stage_within_rule(kernel, plain, oracle, *args):
    """Output and gradients (conftest.sine_loss) of the kernel stage in float32 within twice the
    error of the pure-JAX stage in float32, both against the float64 oracle."""
    reference = output_and_gradients(oracle, *args)
    as32 = [a.astype(jnp.float32) for a in args]
    for i, (got, plain32, expected) in enumerate(
        zip(output_and_gradients(kernel, *as32), output_and_gradients(plain, *as32), reference)
    ):
        assert np.all(np.isfinite(got)), i
        assert within_kernel_rule(got, plain32, expected), "output" if i == 0 else f"d arg {i - 1}"


@pytest.mark.parametrize("dim", [16, 32, 64])
def test_the_tiled_layout_holds_the_exact_state(dim):
    """tiled_from_exact of a state is, tile by tile, c sum_j vec(x_A outer x_B) v_j (c = 1 when A
    lies in B's wide block, else 2), and exact_from_tiled takes it back."""
    x, v = (np.random.default_rng(seed).normal(size=(5, n)) for seed, n in ((0, dim), (1, 3)))
    phi = symmetric_power_embedding(jnp.asarray(x), 2)
    S, z = jnp.einsum("jD,jv->Dv", phi, v), jnp.sum(phi, axis=0)
    features = [
        np.einsum("ja,jb->jab", x.reshape(5, -1, NARROW_BLOCK)[:, a], x.reshape(5, -1, WIDE_BLOCK)[:, b]).reshape(5, -1)
        * (1 if a * NARROW_BLOCK // WIDE_BLOCK == b else 2)
        for a, b in zip(*tile_tables(dim))
    ]
    tiled = np.concatenate(features, axis=1)  # [tokens, D']
    S_tiled, z_tiled = tiled_from_exact(S, z)
    assert relative_error(S_tiled.reshape(-1, 3), tiled.T @ v) < 1e-13
    assert relative_error(z_tiled.reshape(-1), tiled.sum(0)) < 1e-13
    for got, expected in zip(exact_from_tiled(S_tiled, z_tiled, dim), (S, z)):
        assert relative_error(got, expected) < 1e-13


def oracle_states(k, v, log_g):
    S, z, _ = naive.state_scan(
        *naive.chunk_states(k, v, log_g, 2, SCALE, CHUNK), naive.chunk_gate(log_g, k, CHUNK)[:, :, -1]
    )
    return S, z


def flat(S, z):
    return jnp.concatenate([S.reshape(-1), z.reshape(-1)])


@pytest.mark.parametrize("gamma, value_columns", [(None, 32), (0.6, 32), (0.6, 16)])
def test_state_stage(gamma, value_columns):
    """value_columns 16 of dim_v 32: each scan program takes half the state's columns."""
    _, k, v, log_g = inputs(gamma, dim_v=32)
    options = LaunchOptions(compiled=False, scan_value_columns=value_columns)

    def stage(states):
        return lambda k, v, log_g: flat(*exact_from_tiled(*states(k, v, log_g, SCALE, CHUNK, options), k.shape[-1]))

    oracle = lambda k, v, log_g: flat(*oracle_states(k, v, log_g))  # noqa: E731
    assert_stage_within_rule(stage(chunked.kernel_states), stage(chunked.jax_states), oracle, k, v, log_g)


@pytest.mark.parametrize("gamma", [None, 0.6])
def test_outputs_stage(gamma):
    """y, and the gradients in q, k, v, log_g and the entering states S and z (exact layout);
    dim_v 32 in two scan programs' columns of 16."""
    q, k, v, log_g = inputs(gamma, dim_v=32, seed=1)
    S, z = oracle_states(k, v, log_g)
    options = LaunchOptions(compiled=False, scan_value_columns=16)

    def stage(outputs):
        def run(q, k, v, log_g, S, z):
            return outputs(q, k, v, log_g, *tiled_from_exact(S, z), SCALE, CHUNK, options)[0]

        return run

    def oracle(q, k, v, log_g, S, z):
        return naive.chunk_outputs(q, k, v, log_g, S, z, 2, SCALE, CHUNK)

    assert_stage_within_rule(stage(chunked.kernel_outputs), stage(chunked.jax_outputs), oracle, q, k, v, log_g, S, z)


def test_outputs_stage_log_normaliser():
    """Both backends' log-normaliser: the log of the sum of y's weights, the entering state's included."""
    q, k, v, log_g = inputs(0.6, seed=2)
    S, z = oracle_states(k, v, log_g)
    G = naive.chunk_gate(log_g, q, CHUNK)
    qc, kc = (naive.in_chunks(a, CHUNK) for a in (q, k))
    causal = jnp.tril(jnp.ones((CHUNK, CHUNK), bool))[None, None, :, :, None]
    decay = jnp.exp(jnp.where(causal, G[:, :, :, None] - G[:, :, None, :], -jnp.inf))
    local = jnp.sum(jnp.einsum("bnihd,bnjhd->bnijh", SCALE * qc, kc) ** 2 * decay, axis=3)
    phi_q = naive.phi(math.sqrt(SCALE) * qc, 2) * jnp.exp(G)[..., None]
    expected = jnp.log(local + jnp.einsum("bnihD,bnhD->bnih", phi_q, z)).reshape(q.shape[:3])
    for outputs in (chunked.kernel_outputs, chunked.jax_outputs):
        as32 = [a.astype(jnp.float32) for a in (q, k, v, log_g)]
        tiled = tiled_from_exact(*(a.astype(jnp.float32) for a in (S, z)))
        log_normaliser = outputs(*as32, *tiled, SCALE, CHUNK, INTERPRETED)[1]
        assert relative_error(log_normaliser, expected, floor=1.0) < 10 * FLOAT32_ROUNDOFF


def attend_with(options: LaunchOptions):
    """y and sin of the log-normaliser, as one vector, through chunked.chunked with these options."""

    def run(q, k, v, log_g):
        y, log_normaliser = chunked.chunked(q, k, v, log_g, SCALE, CHUNK, options)
        return jnp.concatenate([y.reshape(-1), jnp.sin(log_normaliser).reshape(-1)])

    return run


@pytest.fixture(scope="module", params=[2, 4], ids=["equal-heads", "4-over-2-heads"])
def mixed_inputs_and_all_kernels(request):
    """40 tokens (a partial last chunk), over 2 key/value heads serving 2 or 4 query heads, and the
    all-kernel path's output and gradients there."""
    inputs32 = [a.astype(jnp.float32) for a in inputs(0.8, seq=40, dim=32, seed=3, heads=request.param)]
    return inputs32, output_and_gradients(attend_with(INTERPRETED), *inputs32)


@pytest.mark.parametrize("kernel_stages", [(), ("states",), ("outputs",)])
def test_any_mix_of_stages_equals_the_all_kernel_path(kernel_stages, mixed_inputs_and_all_kernels):
    """y, the log-normaliser and every gradient of each mix against both stages as kernels, with
    their fused backward pass, to float32 round-off."""
    inputs32, all_kernels = mixed_inputs_and_all_kernels
    mix = LaunchOptions(compiled=False, kernel_stages=kernel_stages)
    for name, got, expected in zip(
        ("output", "dq", "dk", "dv", "d log_g"), output_and_gradients(attend_with(mix), *inputs32), all_kernels
    ):
        assert relative_error(got, expected, floor=1.0) < 4 * FLOAT32_ROUNDOFF, name


def test_unknown_kernel_stages_are_refused():
    with pytest.raises(ValueError, match="unknown kernel stages \\['scan'\\]"):
        LaunchOptions(kernel_stages=("states", "scan"))


def test_jax_stages_run_in_float64_alike():
    """The pure-JAX stage backends in float64 (their compute dtype there) compose, through the tiled
    layout, to the oracle's chunked form to 1e-9."""
    q, k, v, log_g = inputs(0.6, seed=4)
    jax_only = LaunchOptions(kernel_stages=())
    S, z = chunked.jax_states(k, v, log_g, SCALE, CHUNK, jax_only)
    y, _ = chunked.jax_outputs(q, k, v, log_g, S, z, SCALE, CHUNK, jax_only)
    assert relative_error(y, naive.chunked_form(q, k, v, log_g, 2, SCALE, CHUNK)[0]) < 1e-9
