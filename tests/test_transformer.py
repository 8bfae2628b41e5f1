"""The model: every variant runs, is causal, and the conformal variant starts as sympow_gated."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sympow

SMALL = dict(vocab_size=50, d_model=16, n_layers=2, n_heads=2, chunk_size=8)


# softmax has one implementation (jax.nn.dot_product_attention); every sympow variant has three.
VARIANT_IMPLS = [("softmax", "auto")] + [
    (a, i) for a in sympow.ATTENTIONS[1:] for i in ("attention", "recurrent", "chunked")
]


@pytest.mark.parametrize("attention, impl", VARIANT_IMPLS)
def test_logits_at_t_do_not_depend_on_later_tokens(attention, impl):
    model = sympow.Transformer(sympow.ModelConfig(**SMALL, attention=attention, impl=impl), key=jax.random.key(0))
    embeddings = jax.random.normal(jax.random.key(1), (2, 21, 16), jnp.float32)
    gradient_of_position = jax.jit(jax.grad(lambda x, t: jnp.sum(model.from_embeddings(x)[:, t])))
    for t in (0, 9, 20):
        grad = gradient_of_position(embeddings, t)
        assert np.all(grad[:, t + 1 :] == 0), f"position {t} sees the future"
        assert np.all(np.any(grad[:, : t + 1] != 0, axis=-1)), f"position {t} ignores its past"


@pytest.mark.parametrize("attention", sympow.ATTENTIONS)
def test_every_variant_gives_finite_logits_and_gradients(attention):
    model = sympow.Transformer(sympow.ModelConfig(**SMALL, attention=attention), key=jax.random.key(2))
    tokens = jax.random.randint(jax.random.key(3), (3, 30), 0, 50)
    logits = jax.jit(lambda m, t: m(t))(model, tokens)
    assert logits.shape == (3, 30, 50) and logits.dtype == jnp.float32

    def loss(model):
        logits = model(tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

    value, grads = eqx.filter_jit(eqx.filter_value_and_grad(loss))(model)
    assert np.isfinite(value) and abs(float(value) - np.log(50)) < 1.0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_variant_parameters():
    count = lambda m, kind: sum(isinstance(x, kind) for x in jax.tree.leaves(m, is_leaf=lambda x: isinstance(x, kind)))  # noqa: E731
    for attention, gates, rotaries in [
        ("softmax", 0, 0),
        ("sympow", 0, 0),
        ("sympow_gated", 2, 0),
        ("conformal", 2, 2),
    ]:
        model = sympow.Transformer(sympow.ModelConfig(**SMALL, attention=attention), key=jax.random.key(0))
        assert count(model, sympow.layers.Gate) == gates
        assert count(model, sympow.rotary.LearnedRotary) == rotaries


def test_conformal_with_zero_rotary_weights_equals_sympow_gated():
    gated = sympow.Transformer(sympow.ModelConfig(**SMALL, attention="sympow_gated"), key=jax.random.key(4))
    conformal = sympow.Transformer(sympow.ModelConfig(**SMALL, attention="conformal"), key=jax.random.key(4))
    tokens = jax.random.randint(jax.random.key(5), (2, 40), 0, 50)
    run = eqx.filter_jit(lambda model, tokens: model(tokens))
    np.testing.assert_array_equal(run(conformal, tokens), run(gated, tokens))
    # ... and differs once the rotary is learned.
    moved = eqx.tree_at(
        lambda m: m.blocks[0].attention.learned_rotary.bias, conformal, jnp.full((2,), 0.5, jnp.float32)
    )
    assert not np.allclose(run(moved, tokens), run(gated, tokens))


def test_gate_starts_near_0999():
    model = sympow.Transformer(sympow.ModelConfig(**SMALL, attention="sympow_gated"), key=jax.random.key(6))
    x = jax.random.normal(jax.random.key(7), (1, 10, 16), jnp.float32)
    gamma = jnp.exp(model.blocks[0].attention.gate(x))
    np.testing.assert_allclose(gamma, 0.999, atol=2e-4)


@pytest.mark.parametrize("gamma", [0.999, 0.9, 0.5])
def test_the_gate_starts_at_the_gamma_asked_for(gamma):
    config = sympow.ModelConfig(**SMALL, attention="sympow_gated", gate_init=gamma)
    x = jax.random.normal(jax.random.key(7), (1, 10, 16), jnp.float32)
    gate = sympow.Transformer(config, key=jax.random.key(6)).blocks[0].attention.gate
    logit = lambda g: np.log(g / (1 - g))  # noqa: E731  (the bias, before the small w_g . x)
    np.testing.assert_allclose(logit(np.exp(gate(x))), logit(gamma), atol=0.05)


def test_a_token_shift_adds_the_previous_tokens_embedding_and_stays_causal():
    """Position t sees token t - 1 through the shift embedding (and no later token); a model
    without MLPs is attention alone."""
    config = sympow.ModelConfig(**SMALL | dict(n_layers=1), attention="sympow_gated", token_shift=True, mlp_ratio=0)
    model = sympow.Transformer(config, key=jax.random.key(9))
    assert model.blocks[0].mlp is None
    tokens = jax.random.randint(jax.random.key(10), (2, 12), 0, 50)
    x = model.lookup(tokens)
    np.testing.assert_array_equal(x[:, 0], model.embedding[tokens[:, 0]])
    np.testing.assert_allclose(x[:, 1:], model.embedding[tokens[:, 1:]] + model.shift_embedding[tokens[:, :-1]])
    logits = model(tokens)
    changed = model(tokens.at[:, 7].set((tokens[:, 7] + 1) % 50))
    np.testing.assert_array_equal(logits[:, :7], changed[:, :7])
    assert not np.allclose(logits[:, 8], changed[:, 8])  # position 8 reads token 7 through the shift
    with pytest.raises(NotImplementedError, match="token shift"):
        model.prefill(tokens)


def test_presets():
    tiny, big = sympow.preset("tiny"), sympow.preset("124m", attention="softmax")
    assert (big.n_layers, big.d_model, big.n_heads, big.head_dim) == (12, 768, 12, 64)
    assert tiny.vocab_size == big.vocab_size == 50257 and big.attention == "softmax"
    model = sympow.Transformer(sympow.preset("124m"), key=jax.random.key(0))
    params = sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    assert 120e6 < params < 130e6, params
    recall = sympow.preset("recall", vocab_size=49)
    assert (recall.n_layers, recall.head_dim, recall.token_shift, recall.vocab_size) == (1, 16, True, 49)
    byte = sympow.preset("bytes", vocab_size=256)
    assert (byte.n_layers, byte.n_heads, byte.head_dim, byte.token_shift) == (2, 4, 16, False)


def test_model_evaluates_longer_than_it_was_built_for():
    model = sympow.Transformer(sympow.ModelConfig(**SMALL, attention="conformal"), key=jax.random.key(8))
    logits = eqx.filter_jit(lambda model, tokens: model(tokens))(model, jnp.zeros((1, 300), jnp.int32))
    assert np.all(np.isfinite(logits))


def test_tokens_must_be_batched():
    model = sympow.Transformer(sympow.ModelConfig(**SMALL), key=jax.random.key(0))
    with pytest.raises((ValueError, TypeError)):
        model(jnp.zeros((10,), jnp.int32))
