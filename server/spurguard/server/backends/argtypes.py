"""argparse types the server-side commands share (export-triton, the offline fit, the demo).

Here, in a module that imports nothing heavy, so that each command can use them without loading
another command's dependencies (export-triton's onnx and tritonclient, say)."""
from __future__ import annotations

import argparse


def at_least_one(text: str) -> int:
    """An integer >= 1 (a count or a size), refused with a message argparse shows."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
