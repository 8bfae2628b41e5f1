"""python -m sympow.sample, as a user runs it: streams text from a run's checkpoint, and refuses
bad requests with a clear message."""

import jax
import pytest

import sympow
from sympow import checkpoint
from sympow.sample import main

# GPT-2's vocabulary, so that any prompt tokenises; small otherwise.
TINY = dict(vocab_size=50257, d_model=16, n_layers=1, n_heads=2, chunk_size=8)


def make_run(folder, attention, context=16):
    model = sympow.Transformer(sympow.ModelConfig(**TINY, attention=attention), key=jax.random.key(0))
    checkpoint.save(folder, 1, model, None, 0, dict(context=context))
    return folder


def test_sample_prints_the_prompt_then_new_text_and_the_rate(tmp_path, capsys):
    run = make_run(tmp_path / "conformal", "conformal")
    sampling = [str(run), "--prompt", "def main(", "--max-new-tokens", "12", "--temperature", "0.8", "--top-k", "40"]
    main([*sampling, "--seed", "1"])
    out, err = capsys.readouterr()
    assert out.startswith("def main(") and len(out) > len("def main(")
    assert "12 new tokens from a conformal model" in err and "tokens/s" in err
    # The same seed, the same text; greedy through --temperature 0 works too.
    main([*sampling, "--seed", "1"])
    assert capsys.readouterr().out == out
    main([str(run), "--prompt", "x", "--max-new-tokens", "3", "--temperature", "0"])


def test_sample_refuses_bad_requests(tmp_path):
    run = make_run(tmp_path / "softmax", "softmax", context=16)
    cases = [
        ([str(run), "--prompt", ""], "the prompt is empty"),
        ([str(tmp_path / "nothing"), "--prompt", "hi"], "holds no checkpoint"),
        ([str(run), "--prompt", "hi", "--temperature", "-1"], "--temperature must be"),
        ([str(run), "--prompt", "hi", "--top-p", "0"], "--top-p must be"),
        (
            [str(run), "--prompt", "word " * 20, "--max-new-tokens", "2"],
            "do not fit this softmax model's key/value cache of 16 tokens",
        ),
        ([str(run)], "give the prompt"),
        ([str(run), "--prompt", "hi", "--max-length", "0"], "--max-length must be"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            main(argv)
