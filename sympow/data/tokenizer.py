"""The two vocabularies of text: GPT-2 BPE, and bytes.

GPT-2 BPE goes through tiktoken, from a vocabulary file that a PyPI package ships.

tiktoken would download GPT-2's ranks at first use; instead we take `gpt2.tiktoken` from the
openai-whisper source archive on PyPI (fetched once with pip, without installing it or its
dependencies) and cache it, so tokenising works on a machine that reaches only PyPI.

Bytes (vocabulary 256) are UTF-8 itself, with byte 0 as end-of-text: it never occurs in text
sources, and a tiny model then spends its time in its layers rather than in a 50257-way softmax."""

import functools
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

END_OF_TEXT = 50256
VOCAB_SIZE = 50257
BYTE_END_OF_TEXT = 0
BYTE_VOCAB_SIZE = 256
VOCAB_PACKAGE = "openai-whisper==20250625"
# GPT-2's pre-tokeniser (the same pattern tiktoken's own "gpt2" encoding uses).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def cache_dir() -> Path:
    """Where sympow keeps what it builds once: $SYMPOW_CACHE, else ~/.cache/sympow."""
    return Path(os.environ.get("SYMPOW_CACHE", Path.home() / ".cache" / "sympow"))


def vocabulary_file() -> Path:
    """The cached gpt2.tiktoken, fetched from PyPI the first time."""
    path = cache_dir() / "gpt2.tiktoken"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            VOCAB_PACKAGE,
            "-d",
            download,
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(download).glob("*.tar.gz"))
        if result.returncode or not archives:
            raise RuntimeError(f"could not fetch the GPT-2 vocabulary ({' '.join(command)}):\n{result.stderr}")
        with tarfile.open(archives[0]) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            partial = path.with_suffix(".partial")
            partial.write_bytes(archive.extractfile(member).read())
            partial.replace(path)
    return path


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    ranks = load_tiktoken_bpe(str(vocabulary_file()))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": END_OF_TEXT},
        explicit_n_vocab=VOCAB_SIZE,
    )


class ByteEncoding:
    """Text as its UTF-8 bytes, with the two methods of tiktoken's Encoding that sampling uses."""

    name = "bytes"

    def encode(self, text: str, allowed_special="all") -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return bytes(tokens)


def end_of_text(vocab_size: int) -> int:
    """The token a window's input starts with: byte 0 for a byte vocabulary, GPT-2's otherwise."""
    return BYTE_END_OF_TEXT if vocab_size == BYTE_VOCAB_SIZE else END_OF_TEXT


def encoding_for(vocab_size: int) -> tuple[tiktoken.Encoding | ByteEncoding, int]:
    """(encoding, end-of-text token) of a model's vocabulary: GPT-2's or bytes'."""
    encodings = {VOCAB_SIZE: gpt2_encoding, BYTE_VOCAB_SIZE: ByteEncoding}
    if vocab_size not in encodings:
        raise ValueError(
            f"a vocabulary of {vocab_size} tokens is neither GPT-2's ({VOCAB_SIZE}) nor bytes' ({BYTE_VOCAB_SIZE}): "
            "this model was not trained on text (a recall task?)"
        )
    return encodings[vocab_size](), end_of_text(vocab_size)
