"""Lossy bit-rounding of float32 data: keep N mantissa bits, so the codecs compress better.

Rounding to nearest, ties to even, on the bit pattern (as numcodecs' ``BitRound`` and
Klöwer et al. 2021): ``keep`` of float32's 23 mantissa bits survive, the others become zero,
so the relative error is at most ``2**-(keep + 1)``. NaN and ±inf stay as they are; a value
may round up to the next power of two (or to inf, for values next to the float32 maximum).
Only for users who choose it: ``output.bitround = 0`` (the default) keeps every bit.
"""

from __future__ import annotations

import numba
import numpy as np

from calstream.errors import ConfigError

__all__ = ["MANTISSA_BITS", "bitround"]

#: Mantissa bits of a float32.
MANTISSA_BITS = 23


@numba.njit(nogil=True, cache=True, fastmath=False)
def _bitround_u32(bits: np.ndarray, drop: int) -> None:  # pragma: no cover - compiled
    half = np.uint32((1 << (drop - 1)) - 1)
    mask = np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    exponent = np.uint32(0x7F800000)
    one = np.uint32(1)
    shift = np.uint32(drop)
    for i in range(bits.size):
        v = bits[i]
        if (v & exponent) != exponent:  # leave NaN and inf alone
            bits[i] = (v + half + ((v >> shift) & one)) & mask


def bitround(data: np.ndarray, keep: int) -> np.ndarray:
    """Round float32 ``data`` in place to ``keep`` mantissa bits (1 to 23); returns it.

    Raises
    ------
    ConfigError
        ``keep`` out of range (key ``output.bitround``).
    ValueError
        ``data`` is not a writable, C-contiguous float32 array.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= MANTISSA_BITS:
        raise ConfigError(
            f"must keep from 1 to {MANTISSA_BITS} mantissa bits. Got {keep!r} instead.",
            key="output.bitround",
        )
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.float32
        and data.flags.c_contiguous
        and data.flags.writeable
    ):
        raise ValueError("bitround needs a writable, C-contiguous float32 array")
    if keep < MANTISSA_BITS:
        _bitround_u32(data.reshape(-1).view(np.uint32), MANTISSA_BITS - keep)
    return data
