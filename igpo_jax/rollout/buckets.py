"""Sizes rounded up to a few values, so that a jitted program compiles for a handful of shapes
instead of one per batch (sampling, scoring)."""

from __future__ import annotations

import math


def power_of_two(n: int, minimum: int = 1) -> int:
    """The smallest power of two ≥ n, and at least `minimum`: up to 2× padding, log₂ shapes."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def quarter_octave(n: int, minimum: int, steps_per_octave: int = 4) -> int:
    """n rounded up to a multiple of 2^floor(log2 n) / steps_per_octave, at least `minimum`:
    ≤ 1/steps_per_octave padding, steps_per_octave shapes per doubling."""
    n = max(n, minimum)
    step = max(1, 2 ** int(math.floor(math.log2(n))) // steps_per_octave)
    return -(-n // step) * step


def quarter_octave_floor(n: int, steps_per_octave: int = 4) -> int:
    """n rounded down to a multiple of 2^floor(log2 n) / steps_per_octave (n ≥ 1): the largest
    of quarter_octave's sizes that is ≤ n."""
    step = max(1, (1 << (n.bit_length() - 1)) // steps_per_octave)
    return n // step * step
