"""Command lines that refuse a bad value before any work: each flag's domain in its type, and one
line naming the flag, the value and what is allowed, with argparse's exit status 2.

    parser = cli.Parser(description=...)
    parser.add_argument("--lr", type=cli.positive(float), default=6e-4)
    parser.refuse("--micro-batch 3 must divide 8 examples per update")  # a check across flags
    cli.refuse("--context 48 must divide the store's rows of 256 tokens")  # later, without the parser
"""

import argparse
import math
import sys
from pathlib import Path


def refuse(message: str, prog: str | None = None):
    """Stop with argparse's status, 2, and one line: for a check made after parsing (across flags,
    or against the data)."""
    sys.stderr.write(f"{prog or Path(sys.argv[0]).name}: error: {message} (see --help)\n")
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line: the full usage of a long command would hide it."""

    def error(self, message: str):
        refuse(message, self.prog)

    def refuse(self, message: str):
        refuse(message, self.prog)


def number(kind, minimum=None, *, strict: bool = False, maximum=None):
    """An argparse type: `kind` (int or float), finite, at least `minimum` (or above it if
    strict), at most `maximum`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number; got {text}")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}; got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}; got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its own messages
    return parse


def positive(kind):
    """An int >= 1, or a float > 0."""
    return number(kind, 1) if kind is int else number(kind, 0, strict=True)


def non_negative(kind):
    return number(kind, 0)
