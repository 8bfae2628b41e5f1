"""The chunked form's backward pass rematerialises phi features one chunk at a time.

Checked on the compiled program (no run): p = 2, d = 64, T = 16384, forward + backward. Keeping
phi(K) and phi(Q) for every chunk would need 2 x T x D floats; the states entering the chunks,
which the backward pass does need, are T / c x D x d."""

import jax
import jax.numpy as jnp

import ops

SEQ, DIM, CHUNK = 16384, 64, 256


def compiled_temp_bytes(impl):
    x = jax.ShapeDtypeStruct((1, SEQ, 1, DIM), jnp.float32)
    log_g = jax.ShapeDtypeStruct((1, SEQ, 1), jnp.float32)

    def loss(q, k, v, log_g):
        return jnp.sum(ops.sympow_attention(q, k, v, log_g, chunk_size=CHUNK, impl=impl))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, x, x, log_g).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_backward_rematerialises_phi(monkeypatch):
    phi_of_q_and_k = 2 * SEQ * ops.embedding_size(DIM, 2) * 4
    with_remat = compiled_temp_bytes("chunked")
    monkeypatch.setattr(jax, "checkpoint", lambda fn, **_: fn)
    without_remat = compiled_temp_bytes("chunked")
    print(
        f"fwd+bwd temp: {with_remat / 2**20:.0f} MiB with remat, {without_remat / 2**20:.0f} MiB without; "
        f"phi(Q) + phi(K): {phi_of_q_and_k / 2**20:.0f} MiB"
    )
    assert with_remat < phi_of_q_and_k
    assert without_remat - with_remat > phi_of_q_and_k
