"""JSON from untrusted bytes (request bodies, safetensors headers): its size and nesting bounded before the parser
runs, so a deep `[[[[...` costs a linear scan and a refusal, never a RecursionError or a parse of megabytes."""

from __future__ import annotations

import json
import re

import numpy as np

from pipeline.errors import BadInput, TooLarge

MAX_DEPTH = 32
_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # JSON strings: their brackets do not nest
_NOT_BRACKETS = re.compile(rb"[^\[\]{}]+")


def nesting(data: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest (an over-estimate for text that is not JSON)."""
    marks = np.frombuffer(_NOT_BRACKETS.sub(b"", _STRINGS.sub(b"", data)), np.uint8)
    if not marks.size:
        return 0
    steps = np.where((marks == ord("[")) | (marks == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def loads(data: bytes, what: str, max_bytes: int, max_depth: int = MAX_DEPTH):
    """`json.loads(data)` after checking its size (TooLarge) and nesting (BadInput); BadInput when it is not JSON."""
    if len(data) > max_bytes:
        raise TooLarge(f"{what} is {len(data):,} bytes, over the limit of {max_bytes:,}")
    depth = nesting(bytes(data))
    if depth > max_depth:
        raise BadInput(f"{what} nests {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(data)
    except RecursionError:  # cannot happen below max_depth; kept so no input ever reaches the caller's 500
        raise BadInput(f"{what} nests too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError: a position, never a trace
        raise BadInput(f"{what} is not JSON ({e})") from None
