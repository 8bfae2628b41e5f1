"""The chunked form stage by stage: each pure-JAX stage of ops.sympow.chunk (what each chunk adds
to the state, the scan over chunks, each chunk's outputs) against the same stage of the float64
oracle (ops/sympow/naive.py), outputs and gradients; and the oracle's three stages composed
against its recurrent form, so that a stage can be trusted, or blamed, on its own."""

import jax.numpy as jnp
import pytest
from conftest import attention_inputs, output_and_gradients, relative_error

from ops.sympow import chunk, naive
from ops.sympow.gate import chunk_local_gates
from ops.sympow.state import SympowState

CHUNK = 4
TOLERANCE = 1e-9  # as tests/test_forms.py: float64 forms against the oracle


def inputs(gamma, p=2, seed=0):
    """q, k, v, log_g of 3 chunks, batch 2, 2 heads, dim 3, and a state S_0 from earlier tokens."""
    q, k, v, log_g = attention_inputs(2, 3 * CHUNK, 2, 3, gamma=gamma, seed=seed)
    earlier = attention_inputs(2, 5, 2, 3, gamma=gamma, seed=seed + 1)
    _, state = naive.recurrent_form(*earlier, p, 0.5)
    return q, k, v, (jnp.zeros(q.shape[:3]) if log_g is None else log_g), state


def local_gates(log_g):
    return chunk_local_gates(chunk.split_chunks(log_g, CHUNK))


def assert_stage_agrees(production, oracle, *args):
    """Output and gradients of the loss of conftest.sine_loss, in every argument."""
    for name, got, expected in zip(
        ("output", *(f"d arg {i}" for i in range(len(args)))),
        output_and_gradients(production, *args),
        output_and_gradients(oracle, *args),
    ):
        assert relative_error(got, expected) < TOLERANCE, name


@pytest.mark.parametrize("gamma", [None, 0.6])
@pytest.mark.parametrize("p", [2, 4])
def test_chunk_states_stage(gamma, p):
    _, k, v, log_g, _ = inputs(gamma, p)

    def production(k, v, log_g):
        kc, vc = chunk.split_chunks(k, CHUNK), chunk.split_chunks(v, CHUNK)
        return jnp.concatenate([a.reshape(-1) for a in chunk.chunk_states(kc, vc, local_gates(log_g), p, 0.5)])

    def oracle(k, v, log_g):
        return jnp.concatenate([a.reshape(-1) for a in naive.chunk_states(k, v, log_g, p, 0.5, CHUNK)])

    assert_stage_agrees(production, oracle, k, v, log_g)


@pytest.mark.parametrize("with_state", [False, True])
def test_state_scan_stage(with_state):
    _, k, v, log_g, state = inputs(0.6)
    added = naive.chunk_states(k, v, log_g, 2, 0.5, CHUNK)
    log_decay = naive.chunk_gate(log_g, k, CHUNK)[:, :, -1]

    def flat(S, z, final):
        return jnp.concatenate([a.reshape(-1) for a in (S, z, *final)])

    def production(added_S, added_z, log_decay, S_0, z_0):
        return flat(*chunk.state_scan(added_S, added_z, log_decay, SympowState(S_0, z_0) if with_state else None))

    def oracle(added_S, added_z, log_decay, S_0, z_0):
        return flat(*naive.state_scan(added_S, added_z, log_decay, (S_0, z_0) if with_state else None))

    assert_stage_agrees(production, oracle, *added, log_decay, *state)


@pytest.mark.parametrize("gamma", [None, 0.6])
@pytest.mark.parametrize("p", [2, 4])
def test_chunk_outputs_stage(gamma, p):
    q, k, v, log_g, _ = inputs(gamma, p, seed=2)
    added = naive.chunk_states(k, v, log_g, p, 0.5, CHUNK)
    S, z, _ = naive.state_scan(*added, naive.chunk_gate(log_g, k, CHUNK)[:, :, -1])

    def production(q, k, v, log_g, S, z):
        qc, kc, vc = (chunk.split_chunks(a, CHUNK) for a in (q, k, v))
        y = chunk.chunk_outputs(qc, kc, vc, local_gates(log_g), S, z, p, 0.5)
        return y.reshape(v.shape)

    def oracle(q, k, v, log_g, S, z):
        return naive.chunk_outputs(q, k, v, log_g, S, z, p, 0.5, CHUNK)

    assert_stage_agrees(production, oracle, q, k, v, log_g, S, z)


@pytest.mark.parametrize("gamma", [None, 0.6])
def test_the_oracles_stages_compose_to_its_recurrent_form(gamma):
    """chunk_states, state_scan and chunk_outputs of the oracle together are its recurrent form,
    from a state handed in, and leave its last state."""
    q, k, v, log_g, state = inputs(gamma, seed=3)
    log_g = None if gamma is None else log_g
    y, final = naive.chunked_form(q, k, v, log_g, 2, 0.5, CHUNK, initial_state=state)
    y_expected, final_expected = naive.recurrent_form(q, k, v, log_g, 2, 0.5, initial_state=state)
    assert relative_error(y, y_expected) < 1e-12
    for got, expected in zip(final, final_expected):
        assert relative_error(got, expected) < 1e-12
