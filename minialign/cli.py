"""What the scripts share at the command line: a parser whose mistakes are one line, typed
flags that check their range when they are parsed, and the error boundary.

The error boundary (`run_main`) is the one place where a `UserError` (minialign.errors) turns
into `error: <message>` on stderr and exit status 2. Any other exception is a bug in minialign
and keeps its traceback. `--debug` (or MINIALIGN_DEBUG=1) shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from .errors import UserError

DEBUG_ENV = "MINIALIGN_DEBUG"
USAGE_ERROR = 2  # the exit status argparse uses for a bad command line; we use it for every user error


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with every flag's default shown in --help and a mistake reported in one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        # argparse prints the whole usage block first; one line that names the flag is enough,
        # and --help is there for the rest.
        self.exit(USAGE_ERROR, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout, and append "(default: X)" to every flag's help."""


# ------------------------------------------------------------------ flag types with ranges

def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_range(low: int | None = None, high: int | None = None):
    """An argparse type: an integer in [low, high] (either end open when None)."""
    def parse(text):
        value = _number(int, text)
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside {_describe(low, high, True, True)}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def float_range(low: float | None = None, high: float | None = None, low_open: bool = False,
                high_open: bool = False):
    """An argparse type: a finite number in the interval [low, high], `(` / `)` where open."""
    def parse(text):
        value = _number(float, text)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{value:g} is outside {_describe(low, high, not low_open, not high_open)}")
        return value
    parse.__name__ = "number"
    return parse


def _describe(low, high, low_closed: bool, high_closed: bool) -> str:
    if high is None:
        return f"the allowed range (must be {'>=' if low_closed else '>'} {low:g})"
    if low is None:
        return f"the allowed range (must be {'<=' if high_closed else '<'} {high:g})"
    return f"the allowed range {'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"


positive_int = int_range(1)
non_negative_int = int_range(0)
positive_float = float_range(0.0, low_open=True)
non_negative_float = float_range(0.0)

# The spellings users type for the two training precisions.
TRAIN_DTYPES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
EVAL_DTYPES = {**TRAIN_DTYPES, "fp16": "fp16", "float16": "fp16"}


def train_dtype(text: str) -> str:
    """--dtype of the trainers: fp32 / float32, or bf16 / bfloat16 (autocast, fp32 master weights)."""
    key = text.lower()
    if key in ("fp16", "float16", "half"):
        raise argparse.ArgumentTypeError(
            "fp16 training is not supported: its 5-bit exponent overflows without loss scaling, "
            "which minialign does not implement; use bf16 (same speed on GPUs that have it) or fp32")
    if key not in TRAIN_DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(TRAIN_DTYPES)}")
    return TRAIN_DTYPES[key]


def eval_dtype(text: str) -> str:
    """--dtype of evaluation (weights as loaded): fp32, bf16 or fp16 in any usual spelling."""
    key = text.lower()
    if key not in EVAL_DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(EVAL_DTYPES)}")
    return EVAL_DTYPES[key]


# ------------------------------------------------------------------------- error boundary

def debug_requested(argv) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_main(main, argv=None):
    """Call main(argv); a UserError becomes one line on stderr and exit status 2.

    Under torchrun every rank that fails prints its line (rank 0 unprefixed, the others with
    their rank), since a mistake may be local to one node (a file missing on its disk)."""
    try:
        return main(argv)
    except UserError as e:
        if debug_requested(argv):
            raise
        rank = int(os.environ.get("RANK", "0") or 0)
        prefix = "error: " if rank == 0 else f"error (rank {rank}): "
        print(prefix + " ".join(str(e).split("\n")), file=sys.stderr, flush=True)
        sys.exit(USAGE_ERROR)


__all__ = [
    "ArgumentParser", "HelpFormatter", "int_range", "float_range", "positive_int", "non_negative_int",
    "positive_float", "non_negative_float", "train_dtype", "eval_dtype", "run_main", "debug_requested",
]
