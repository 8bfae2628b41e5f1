"""python -m sympow.sample, as a user runs it: streams text from a run's checkpoint, and refuses
bad requests with a clear message."""

import jax
import pytest

import sympow
from sympow import checkpoint
from sympow.sample import main

# GPT-2's vocabulary, so that any prompt tokenises; small otherwise.
TINY = dict(vocab_size=50257, d_model=16, n_layers=1, n_heads=2, chunk_size=8)


def make_run(folder, attention, context=16, **config):
    model = sympow.Transformer(sympow.ModelConfig(**{**TINY, **config}, attention=attention), key=jax.random.key(0))
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


@pytest.mark.parametrize("attention", ["conformal", "softmax"])
def test_several_prompts_run_as_one_batch_each_as_it_would_alone(tmp_path, capsys, attention):
    """Greedy: each prompt's continuation in the batch (prompts of different lengths, a state or
    a key/value cache) is the one it gets alone; --prompt-file's lines are the same batch."""
    run = make_run(tmp_path / attention, attention, context=32)
    prompts = ["def main(", "x", "import os, sys"]
    greedy = ["--max-new-tokens", "6", "--temperature", "0"]
    alone = []
    for prompt in prompts:
        main([str(run), "--prompt", prompt, *greedy])
        alone.append(capsys.readouterr().out)
    main([str(run), *[a for prompt in prompts for a in ("--prompt", prompt)], *greedy])
    out, err = capsys.readouterr()
    for number, text in enumerate(alone, 1):
        assert f"=== prompt {number} of 3 ===\n{text}\n" in out, (number, text, out)
    assert "for each of 3 prompts in one batch" in err
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[:1] + [""] + prompts[1:]) + "\n", encoding="utf-8")
    main([str(run), "--prompt-file", str(tmp_path / "prompts.txt"), *greedy])
    assert capsys.readouterr().out == out


def test_a_byte_model_reads_and_writes_bytes(tmp_path, capsys):
    run = make_run(tmp_path / "bytes", "sympow_gated", vocab_size=256)
    main([str(run), "--prompt", "café", "--max-new-tokens", "40", "--seed", "3"])
    out, err = capsys.readouterr()
    assert out.startswith("café") and len(out.encode()) > len("café".encode())  # bytes, decoded as UTF-8 can be
    assert "40 new tokens from a sympow_gated model" in err


def test_a_model_of_a_recall_task_is_refused(tmp_path):
    run = make_run(tmp_path / "recall", "softmax", vocab_size=49)
    with pytest.raises(SystemExit, match="49 tokens is neither GPT-2's .* nor bytes'"):
        main([str(run), "--prompt", "hi"])


def test_sample_refuses_bad_requests(tmp_path, capsys):
    run = make_run(tmp_path / "softmax", "softmax", context=16)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases = [  # (arguments, exit status: 2 for a bad value, 1 for a request that cannot be served, message)
        ([str(run), "--prompt", ""], 2, "the prompt is empty"),
        ([str(run), "--prompt", "hi", "--prompt", ""], 2, "the prompt is empty"),
        ([str(tmp_path / "nothing"), "--prompt", "hi"], 1, "does not exist"),
        ([str(tmp_path), "--prompt", "hi"], 1, "holds no complete checkpoint"),
        ([str(run), "--prompt", "hi", "--temperature", "-1"], 2, "argument --temperature: must be >= 0"),
        ([str(run), "--prompt", "hi", "--top-p", "0"], 2, "argument --top-p: must be > 0"),
        ([str(run), "--prompt", "hi", "--top-k", "0"], 2, "argument --top-k: must be >= 1"),
        ([str(run), "--prompt-file", str(tmp_path / "latin1.txt")], 2, "is not UTF-8 text"),
        ([str(run), "--prompt-file", str(tmp_path / "missing.txt")], 2, "cannot be read"),
        (
            [str(run), "--prompt", "word " * 20, "--max-new-tokens", "2"],
            1,
            "do not fit this softmax model's key/value cache of 16 tokens",
        ),
        ([str(run)], 2, "give the prompt"),
        ([str(run), "--prompt", "hi", "--max-length", "0"], 2, "argument --max-length: must be >= 1"),
    ]
    for argv, status, message in cases:
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        said = capsys.readouterr().err + (stopped.value.code if isinstance(stopped.value.code, str) else "")
        assert (1 if isinstance(stopped.value.code, str) else stopped.value.code) == status, argv
        assert message in said, (argv, said)
