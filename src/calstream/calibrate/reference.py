"""JUNGFRAU correction in plain NumPy, written as the facility formula.

This is the yardstick the Numba and Cython kernels are checked against, and the "numpy"
backend. Per frame f with memory cell c = ``cell[f]`` and gain stage g of each pixel::

    E = (adc - Offset[c, g]) / RelativeGain[c, g]      (a division, not the folded table)
    mask = BadPixels[c, g]                              (Dark | FF | NaN/range bits)
    E = 0 where mask != 0

Gain stage from the gain code (bits 14-15 of ``adc``, or the separate ``gain`` array):
0 -> G0, 1 -> G1, 3 -> G2; any other code is invalid: gain 3, mask WRONG_GAIN_VALUE, E = 0.
The ADC value is always the low 14 bits of ``adc``.
"""

from __future__ import annotations

import numpy as np

from calstream.calibrate.constants import BADPIX, JungfrauConstants

__all__ = ["correct_jungfrau_reference"]

ADC_MASK = 0x3FFF
GAIN_SHIFT = 14
INVALID_GAIN = 3


def _outputs(
    shape: tuple[int, ...],
    out_data: np.ndarray | None,
    out_gain: np.ndarray | None,
    out_mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if out_data is None:
        out_data = np.empty(shape, np.float32)
    if out_gain is None:
        out_gain = np.empty(shape, np.uint8)
    if out_mask is None:
        out_mask = np.empty(shape, np.uint32)
    return out_data, out_gain, out_mask


def correct_jungfrau_reference(
    adc: np.ndarray,
    gain: np.ndarray | None,
    cell: np.ndarray,
    consts: JungfrauConstants,
    out_data: np.ndarray | None = None,
    out_gain: np.ndarray | None = None,
    out_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correct JUNGFRAU frames with NumPy.

    Parameters
    ----------
    adc
        uint16 (n, slow_scan, fast_scan) raw frames.
    gain
        uint8 (n, slow_scan, fast_scan) gain codes, or ``None`` for gain bits in ``adc``.
    cell
        (n,) index of each frame's constants cell.
    consts
        Constants whose frame shape matches ``adc``.
    out_data, out_gain, out_mask
        Optional outputs, float32 / uint8 / uint32 of ``adc``'s shape; allocated if None.

    Returns
    -------
    (data, gain, mask)
    """
    adc = np.asarray(adc)
    out_data, out_gain, out_mask = _outputs(adc.shape, out_data, out_gain, out_mask)
    cell = np.asarray(cell, dtype=np.intp)
    for f in range(adc.shape[0]):
        raw = adc[f].astype(np.uint16, copy=False)
        code = (raw >> GAIN_SHIFT) if gain is None else np.asarray(gain[f])
        value = (raw & ADC_MASK).astype(np.float32)
        stage = np.full(raw.shape, -1, np.int8)
        stage[code == 0] = 0
        stage[code == 1] = 1
        stage[code == 3] = 2
        valid = stage >= 0
        idx = np.where(valid, stage, 0)[None]
        c = cell[f]
        offset = np.take_along_axis(consts.offset[c], idx, axis=0)[0]
        rel_gain = np.take_along_axis(consts.rel_gain[c], idx, axis=0)[0]
        badpix = np.take_along_axis(consts.badpix[c], idx, axis=0)[0]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            energy = (value - offset) / rel_gain
        mask = np.where(valid, badpix, np.uint32(BADPIX.WRONG_GAIN_VALUE))
        out_data[f] = np.where(mask != 0, np.float32(0), energy)
        out_gain[f] = np.where(valid, stage, INVALID_GAIN)
        out_mask[f] = mask
    return out_data, out_gain, out_mask
