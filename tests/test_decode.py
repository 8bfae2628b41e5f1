"""Inference: prefill then decode gives the full forward pass's logits, for every variant and
cache; generate and its sampling; rotary positions exact after 65,536 decode steps."""

import importlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error

import sympow
from sympow.generate import nucleus
from sympow.rotary import frequencies_in_turns, positions, rotation_angles

SMALL = dict(vocab_size=50, d_model=16, n_layers=2, n_heads=2, chunk_size=8)
# p = 4 at head dim 64: a state of 766480 x 64 per head, so decoding keeps keys and values.
WIDE = dict(vocab_size=50, d_model=64, n_layers=1, n_heads=1, chunk_size=8, p=4)
# Grouped key/value heads: 4 query heads over 2 key/value heads of 8 (and p = 4: 2 over 1 of 64).
GROUPED = dict(SMALL, d_model=32, n_heads=4, n_kv_heads=2)
WIDE_GROUPED = dict(WIDE, d_model=128, n_heads=2, n_kv_heads=1)
MODELS = [(attention, shape) for shape in (SMALL, GROUPED) for attention in sympow.ATTENTIONS]
MODELS += [("sympow_gated", WIDE), ("sympow_gated", WIDE_GROUPED)]
SHAPE_NAMES = {id(SMALL): "small", id(GROUPED): "grouped", id(WIDE): "wide", id(WIDE_GROUPED): "wide-grouped"}


def make_model(attention, shape, dtype=jnp.float64, seed=0):
    model = sympow.Transformer(sympow.ModelConfig(**shape, attention=attention), key=jax.random.key(seed))
    if attention == "conformal":  # a rotary that has learned something, so that beta varies
        model = eqx.tree_at(
            lambda m: [b.attention.learned_rotary.weight for b in m.blocks],
            model,
            [
                0.3 * jax.random.normal(jax.random.key(i), b.attention.learned_rotary.weight.shape)
                for i, b in enumerate(model.blocks)
            ],
        )
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, model)


def prefill_then_decode(model, tokens, prompt_length):
    """Logits at positions prompt_length - 1 .. end: one from prefill, then one per decode step."""
    logits, cache = eqx.filter_jit(lambda m, t: m.prefill(t, tokens.shape[1]))(model, tokens[:, :prompt_length])
    decode = eqx.filter_jit(lambda m, t, c: m.decode(t, c))
    every = [logits]
    for t in range(prompt_length, tokens.shape[1]):
        logits, cache = decode(model, tokens[:, t], cache)
        every.append(logits)
    return jnp.stack(every, axis=1)


@pytest.mark.parametrize("attention, shape", MODELS, ids=[f"{a}-{SHAPE_NAMES[id(s)]}" for a, s in MODELS])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_prefill_then_decode_gives_the_forward_pass_logits(attention, shape, dtype):
    """Prompts ending inside (5) and on (16) a chunk boundary, decoding across the next ones, batch 2."""
    model = make_model(attention, shape, dtype)
    assert model.blocks[0].attention.holds_state == (attention != "softmax" and shape.get("p", 2) == 2)
    tokens = jax.random.randint(jax.random.key(1), (2, 23), 0, 50)
    full = eqx.filter_jit(lambda m, t: m(t))(model, tokens)
    tolerance = 1e-9 if dtype == jnp.float64 else 1e-4
    for prompt_length in (5, 16):
        decoded = prefill_then_decode(model, tokens, prompt_length)
        assert decoded.dtype == dtype
        assert relative_error(decoded, full[:, prompt_length - 1 :]) < tolerance, prompt_length


@pytest.mark.parametrize("attention", ["softmax", "conformal"])
def test_greedy_generation_is_the_forward_pass_argmax_token_by_token(attention):
    model = make_model(attention, SMALL, jnp.float32, seed=3)
    prompt = jax.random.randint(jax.random.key(4), (2, 6), 0, 50)
    generated = sympow.generate(model, prompt, 7, key=jax.random.key(5), temperature=0)
    assert generated.shape == (2, 13) and np.all(generated[:, :6] == prompt)
    forward = eqx.filter_jit(lambda m, t: m(t))
    for t in range(6, 13):
        np.testing.assert_array_equal(generated[:, t], jnp.argmax(forward(model, generated[:, :t])[:, -1], axis=-1))


def test_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = make_model("sympow_gated", SMALL, jnp.float32, seed=6)
    # Larger logits than at initialisation, so that samples differ from greedy.
    model = eqx.tree_at(lambda m: m.embedding, model, 40 * model.embedding)
    prompt = jax.random.randint(jax.random.key(7), (3, 4), 0, 50)
    run = lambda key, **kw: sympow.generate(model, prompt, 10, key=jax.random.key(key), **kw)  # noqa: E731
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))
    greedy = run(0, temperature=0)
    assert not np.array_equal(run(0), greedy)
    np.testing.assert_array_equal(run(1, top_k=1), greedy)
    np.testing.assert_array_equal(run(2, top_p=1e-6), greedy)


def test_generate_compiles_once_for_calls_with_the_same_shapes_and_settings(monkeypatch):
    """A trace of the compiled generation samples twice (in the decode scan's body and after
    it), so the count of sample_token calls counts compiles: one for three calls with new keys,
    one more for new settings."""
    generation = importlib.import_module("sympow.generate")  # sympow.generate is the function
    traced = []
    sample = generation.sample_token
    monkeypatch.setattr(generation, "sample_token", lambda *args: traced.append(1) or sample(*args))
    model = make_model("sympow_gated", SMALL, jnp.float32)
    prompt = jax.random.randint(jax.random.key(0), (2, 3), 0, 50)
    for seed in range(3):
        sympow.generate(model, prompt, 4, key=jax.random.key(seed), temperature=0.7, top_k=5)
    assert len(traced) == 2
    sympow.generate(model, prompt, 4, key=jax.random.key(0), temperature=0.7, top_k=6)
    assert len(traced) == 4


def test_a_stop_token_ends_its_row_and_the_lengths_say_where():
    model = make_model("sympow_gated", SMALL, jnp.float32, seed=6)
    model = eqx.tree_at(lambda m: m.embedding, model, 40 * model.embedding)  # samples that vary
    prompt = jax.random.randint(jax.random.key(7), (3, 4), 0, 50)
    run = lambda **kw: sympow.generate(model, prompt, 12, key=jax.random.key(3), **kw)  # noqa: E731
    free = np.asarray(run())
    stop = int(free[0, 4 + 5])  # row 0's sixth new token
    tokens, lengths = run(stop_tokens=(stop,), pad_token=0, return_lengths=True)
    for row, length in zip(range(3), np.asarray(lengths)):
        new = list(free[row, 4:])
        expected = new.index(stop) + 1 if stop in new else 12
        assert length == expected and length <= (6 if row == 0 else 12)
        np.testing.assert_array_equal(tokens[row, : 4 + length], free[row, : 4 + length])
        assert np.all(np.asarray(tokens[row, 4 + length :]) == 0)
    np.testing.assert_array_equal(run(stop_tokens=(stop,))[0, 4 + lengths[0] :], stop)  # padded with the stop
    no_stop, every = run(return_lengths=True)
    np.testing.assert_array_equal(no_stop, free)
    np.testing.assert_array_equal(every, [12, 12, 12])
    with pytest.raises(ValueError, match="token ids in 0..49"):
        run(stop_tokens=(50,))


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probabilities = jnp.array([[0.1, 0.4, 0.05, 0.3, 0.15]])
    logits = jnp.log(probabilities)
    kept = lambda p: set(np.flatnonzero(np.isfinite(nucleus(logits, p)[0])))  # noqa: E731
    assert kept(0.4) == {1}  # 0.4 alone reaches 0.4
    assert kept(0.41) == {1, 3}
    assert kept(0.7) == {1, 3}
    assert kept(0.71) == {1, 3, 4}
    assert kept(1.0) == {0, 1, 2, 3, 4}
    draws = jax.vmap(lambda key: sympow.sample_token(logits, key, top_p=0.7))(jax.random.split(jax.random.key(0), 400))
    assert set(np.unique(draws)) == {1, 3}


def test_learned_rotary_angles_after_65536_decode_steps_match_float64():
    """The position goes on one token at a time as an exact pair; after 65,536 steps of learned
    beta in float32 the angles are within 1e-4 rad of theta * sum beta in float64."""
    beta = jax.random.uniform(jax.random.key(0), (65536, 1, 1, 2), jnp.float32, 0.0, 2.0)

    def step(position, beta_t):
        angles = rotation_angles(beta_t, 64, 65536, position)
        return tuple(part[:, -1] for part in positions(beta_t, position)), angles[:, 0]

    start = (jnp.zeros((1, 2), jnp.float32),) * 2
    _, angles = jax.jit(lambda b: jax.lax.scan(step, start, b))(beta)
    exact = (
        2
        * np.pi
        * np.cumsum(np.asarray(beta, np.float64)[:, 0, 0], axis=0)[..., None]
        * frequencies_in_turns(64, 65536).astype(np.float64)
    )
    gap = np.abs(np.angle(np.exp(1j * (np.asarray(angles[:, 0], np.float64) - exact))))
    assert gap.max() < 1e-4, gap.max()


def test_bad_decoding_requests_are_refused_clearly():
    model = make_model("softmax", SMALL, jnp.float32)
    prompt = jnp.zeros((1, 6), jnp.int32)
    with pytest.raises(ValueError, match="does not fit a key/value cache of 4"):
        model.prefill(prompt, 4)
    with pytest.raises(ValueError, match="at least one token"):
        sympow.generate(model, jnp.zeros((1, 0), jnp.int32), 3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="temperature"):
        sympow.generate(model, prompt, 3, key=jax.random.key(0), temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        sympow.generate(model, prompt, 3, key=jax.random.key(0), top_p=0.0)
    # Decoding past a key/value cache's last slot gives NaN, not a silently wrong token.
    logits, cache = model.prefill(prompt, 7)
    logits, cache = model.decode(jnp.zeros((1,), jnp.int32), cache)
    assert np.all(np.isfinite(logits))
    logits, _ = model.decode(jnp.zeros((1,), jnp.int32), cache)
    assert np.all(np.isnan(logits))
    with pytest.raises((ValueError, TypeError), match="token"):  # the suite's shape checker may come first
        model.decode(jnp.zeros((1, 1), jnp.int32), cache)
    with pytest.raises(ValueError, match="the cache holds 1 layers; this model has 2"):
        model.decode(jnp.zeros((1,), jnp.int32), cache[:1])
    with pytest.raises(ValueError, match="at least one token"):
        model.prefill(jnp.zeros((1, 0), jnp.int32))


@pytest.mark.parametrize(
    "attention, shape", [("softmax", GROUPED), ("conformal", GROUPED), ("sympow_gated", WIDE_GROUPED)]
)
def test_a_grouped_model_keeps_one_cache_entry_per_key_value_head(attention, shape):
    """The state, or the keys and values and G, per key/value head: the caches of 4 query heads
    over 2 are those of a 2-head model; the gate and the learned rotary per key/value head too."""
    model = make_model(attention, shape, jnp.float32)
    cfg, layer = model.config, model.blocks[0].attention
    assert layer.qkv.weight.shape[-1] == cfg.d_model + 2 * cfg.kv_heads * cfg.head_dim
    if layer.gate is not None:
        assert layer.gate.projection.weight.shape[-1] == cfg.kv_heads
    if layer.learned_rotary is not None:
        assert layer.learned_rotary.weight.shape[-1] == cfg.kv_heads
    _, caches = model.prefill(jnp.zeros((1, 5), jnp.int32), 9)
    cache = caches[0]
    parts = [cache.state.S, cache.state.z] if hasattr(cache, "state") else [cache.cache.k, cache.cache.v]
    heads_axis = 1 if hasattr(cache, "state") else 2
    assert all(part.shape[heads_axis] == cfg.kv_heads for part in parts)
    assert all(part.shape[-1] == cfg.kv_heads for part in cache.position)


RAGGED = [(attention, SMALL) for attention in sympow.ATTENTIONS] + [("conformal", GROUPED), ("sympow_gated", WIDE)]


@pytest.mark.parametrize("attention, shape", RAGGED, ids=[f"{a}-{SHAPE_NAMES[id(s)]}" for a, s in RAGGED])
def test_a_ragged_batch_prefills_and_decodes_as_each_row_alone(attention, shape):
    """Prompts of 3, 7 and 5 tokens right-padded to 7 (random tokens as padding), then 4 decode
    steps: every row's logits equal those of its prompt prefilled alone, float64, for the state
    caches and the key/value caches (softmax; p = 4 at head dim 64), grouped heads too."""
    model = make_model(attention, shape)
    lengths = np.array([3, 7, 5])
    tokens = jax.random.randint(jax.random.key(2), (3, 11), 0, 50)
    prefill = eqx.filter_jit(lambda m, t, n: m.prefill(t, 11, n))
    decode = eqx.filter_jit(lambda m, t, c: m.decode(t, c))

    def logits_after(prompt, lengths, next_tokens):
        logits, cache = prefill(model, prompt, lengths)
        every = [logits]
        for t in range(next_tokens.shape[1]):
            logits, cache = decode(model, next_tokens[:, t], cache)
            every.append(logits)
        return jnp.stack(every, axis=1)

    next_tokens = jnp.stack([tokens[b, n : n + 4] for b, n in enumerate(lengths)])
    batched = logits_after(tokens[:, :7], jnp.asarray(lengths), next_tokens)
    for b, n in enumerate(lengths):
        alone = logits_after(tokens[b : b + 1, :n], None, next_tokens[b : b + 1])
        assert relative_error(batched[b : b + 1], alone) < 1e-9, b


def test_generate_a_ragged_batch_greedily_as_each_prompt_alone():
    """Greedy, float64: row b is its prompt's generation alone, its tokens right after its prompt,
    then padding; prompts of a batch that end on their last column are untouched."""
    model = make_model("sympow_gated", SMALL)
    prompt = jax.random.randint(jax.random.key(8), (3, 6), 1, 50)
    lengths = jnp.array([2, 6, 4])
    tokens, new = sympow.generate(
        model, prompt, 5, key=jax.random.key(0), temperature=0, lengths=lengths, pad_token=0, return_lengths=True
    )
    assert tokens.shape == (3, 11) and np.all(np.asarray(new) == 5)
    for b, n in enumerate(np.asarray(lengths)):
        alone = sympow.generate(model, prompt[b : b + 1, :n], 5, key=jax.random.key(0), temperature=0)
        np.testing.assert_array_equal(tokens[b, : n + 5], alone[0])
        assert np.all(np.asarray(tokens[b, n + 5 :]) == 0)
    # Under jit the lengths are values only when it runs: the same tokens, no check to trip on.
    in_jit = jax.jit(
        lambda lengths: sympow.generate(model, prompt, 5, key=jax.random.key(0), temperature=0, lengths=lengths)
    )
    np.testing.assert_array_equal(in_jit(lengths), tokens)
    for bad in ([2, 7, 4], [2, 0, 4]):  # past the padded prompt; a prompt without a token
        with pytest.raises(ValueError, match=r"lengths must be in 1..6"):
            sympow.generate(model, prompt, 2, key=jax.random.key(0), lengths=jnp.array(bad))
        with pytest.raises(ValueError, match=r"lengths must be in 1..6"):
            model.prefill(prompt, 8, jnp.array(bad))
