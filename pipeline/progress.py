"""Tile-step progress: the diffusion stage reports each network call's share of each image's work as it happens.

A driver that runs the stages in its own process (the local loop) listens, and draws a bar that moves per
tile-step; elsewhere (a Ray actor, a Serve replica) nobody listens and a report costs one empty loop. The work of
an image is its tiles times the network calls of its sampler (`forwards`), known from the tile plan alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

_LISTENERS: list[Callable[[str, int], None]] = []


@contextmanager
def listening(fn: Callable[[str, int], None]) -> Iterator[None]:
    """Inside the block, fn(key, tile_forwards) hears every network call's work on the image with that key."""
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.remove(fn)


def report(key: str, tile_forwards: int) -> None:
    """`tile_forwards` tiles of image `key` went through the network once more."""
    for fn in list(_LISTENERS):
        fn(key, tile_forwards)


def forwards(n_tiles: int, steps: int, guided: bool) -> int:
    """An image's work in tile-forwards: each step runs every tile once (twice with classifier-free guidance)."""
    return n_tiles * steps * (2 if guided else 1)
