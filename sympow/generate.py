"""Generation: prefill the prompt in one call, then one compiled scan of decode steps.

Sampling takes the logits at a temperature, keeps the top_k most likely tokens and, of those,
the smallest set whose probability reaches top_p (nucleus sampling), then draws one.
temperature=0 is greedy (argmax).
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ops.sympow.api import check_lengths
from sympow.transformer import Transformer


def check_sampling(temperature, top_k, top_p) -> None:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy); got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None; got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None; got {top_p!r}")


def nucleus(logits: Float[Array, "batch vocab"], top_p: int | float) -> Float[Array, "batch vocab"]:
    """-inf outside the smallest set of most likely tokens whose probability reaches top_p: a
    token stays if the tokens more likely than it hold less than top_p."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_probabilities = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    before = jnp.cumsum(sorted_probabilities, axis=-1) - sorted_probabilities
    keep_sorted = before < top_p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def sample_token(
    logits: Float[Array, "batch vocab"],
    key: PRNGKeyArray,
    temperature: int | float = 1.0,
    top_k: int | None = None,
    top_p: int | float | None = None,
) -> Int[Array, " batch"]:
    """One token per row from the logits (see the module docstring)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if top_p is not None and top_p < 1:
        logits = nucleus(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    model: Transformer,
    prompt: Int[Array, "batch prompt"],
    max_new_tokens: int,
    *,
    key: PRNGKeyArray,
    temperature: int | float = 1.0,
    top_k: int | None = None,
    top_p: int | float | None = None,
    lengths: Int[Array, " batch"] | None = None,
    stop_tokens: tuple[int, ...] = (),
    pad_token: int | None = None,
    return_lengths: bool = False,
) -> Int[Array, "batch total"] | tuple[Int[Array, "batch total"], Int[Array, " batch"]]:
    """The prompt followed by max_new_tokens sampled tokens, [batch, prompt + new] in the prompt's
    dtype. A key/value cache (softmax, or a state too large to hold) is made for exactly that many.

    lengths: prompts of different lengths, right-padded: row b's prompt is prompt[b, :lengths[b]]
    (1..prompt). Its new tokens follow its own last token, from the logits and cache it would
    have alone (greedy, a row is what generating its prompt alone gives; a sample draws from the
    same distribution, with other random bits). Each row ends with pad_token past its prompt and
    new tokens.

    stop_tokens: a row that samples one of these (an end-of-text token, say) ends there; its later
    tokens are pad_token (default: the first stop token, else 0). return_lengths=True returns
    (tokens, the new tokens of each row [batch], its stop token counted). The batch decodes to the
    end in one compiled scan, so stopping changes the result, not the time."""
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"the prompt must be [batch, tokens] with at least one token; got shape {prompt.shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    stop_tokens = tuple(stop_tokens)
    pad_token = (stop_tokens[0] if stop_tokens else 0) if pad_token is None else pad_token
    for token in (*stop_tokens, pad_token):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < model.config.vocab_size:
            raise ValueError(
                f"stop and pad tokens must be token ids in 0..{model.config.vocab_size - 1}; got {token!r}"
            )
    batch, prompt_length = prompt.shape
    if lengths is None:
        lengths = jnp.full((batch,), prompt_length, jnp.int32)
    else:
        check_lengths(lengths, batch, prompt_length, shortest=1)  # every prompt needs a token
        lengths = jnp.asarray(lengths, jnp.int32)
    if max_new_tokens == 0:
        new = jnp.zeros((batch, 0), prompt.dtype)
    else:
        new = generate_compiled(model, prompt, lengths, key, max_new_tokens, Sampling(temperature, top_k, top_p))
    new, new_lengths = stopped(new, stop_tokens, pad_token)
    tokens = each_row_in_place(prompt, lengths, new, pad_token)
    return (tokens, new_lengths) if return_lengths else tokens


def stopped(new, stop_tokens: tuple[int, ...], pad_token: int):
    """The new tokens with every row's tokens after its first stop token set to pad_token, and
    the number of each row's new tokens up to and including that stop (all, without one)."""
    is_stop = jnp.isin(new, jnp.asarray(stop_tokens, new.dtype)) if stop_tokens else jnp.zeros(new.shape, bool)
    stops = is_stop.astype(jnp.int32)
    after_stop = jnp.cumsum(stops, axis=1) - stops > 0  # past the row's first stop token
    lengths = jnp.sum(~after_stop, axis=1).astype(jnp.int32)
    return jnp.where(after_stop, jnp.asarray(pad_token, new.dtype), new), lengths


def each_row_in_place(prompt, lengths, new, pad_token: int):
    """[batch, prompt + new]: row b's prompt (its first lengths[b] tokens), its new tokens right
    after, then pad_token."""
    batch, prompt_length = prompt.shape
    positions = jnp.arange(prompt_length + new.shape[1], dtype=lengths.dtype)[None, :]
    tokens = jnp.full((batch, positions.shape[1]), pad_token, prompt.dtype).at[:, :prompt_length].set(prompt)
    tokens = jnp.where(positions < lengths[:, None], tokens, pad_token)
    columns = lengths[:, None] + jnp.arange(new.shape[1], dtype=lengths.dtype)[None, :]
    return tokens.at[jnp.arange(batch)[:, None], columns].set(new.astype(prompt.dtype))


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling settings, hashed by value: the compiled generation is static in them, and a
    fresh functools.partial each call would compile it again every call (1 to 4 s for a toy model)."""

    temperature: int | float
    top_k: int | None
    top_p: int | float | None

    def __call__(self, logits, key):
        return sample_token(logits, key, self.temperature, self.top_k, self.top_p)


@eqx.filter_jit
def generate_compiled(model, prompt, lengths, key, max_new_tokens, sample):
    """The new tokens [batch, max_new_tokens] after each row's prompt."""
    logits, cache = model.prefill(prompt, prompt.shape[1] + max_new_tokens, lengths)
    keys = jax.random.split(key, max_new_tokens)

    def step(carry, key):
        logits, cache = carry
        token = sample(logits, key)
        return model.decode(token, cache), token

    (logits, _), tokens = jax.lax.scan(step, (logits, cache), keys[:-1])
    return jnp.concatenate([jnp.moveaxis(tokens, 0, 1), sample(logits, keys[-1])[:, None]], axis=1)
