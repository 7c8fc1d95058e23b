"""Bounded fuzz inputs shared by the tests: random bytes and mutations of valid samples."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence


def cases(rng: random.Random, samples: Sequence[bytes], count: int, max_random: int = 300,
          truncate: bool = False) -> Iterator[bytes]:
    """``count`` inputs: every third one random bytes, the rest 1-3 flipped bytes of a sample
    (optionally cut short), so a decoder sees both garbage and near-misses."""
    for i in range(count):
        if i % 3 == 0:
            yield rng.randbytes(rng.randrange(1, max_random))
            continue
        buf = bytearray(rng.choice(samples))
        for _ in range(rng.randrange(1, 4)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        yield bytes(buf[:rng.randrange(1, len(buf) + 1)] if truncate else buf)
