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


# -- AGIPD, LPD, ePix100, common mode, photons -------------------------------------------------
#
#   AGIPD:   g = 0; 1 where digital > T0[c]; 2 where digital > T1[c]
#            E = (analog - Offset[c, g]) * gain[c, g]          (gain = relative gain x FF)
#   LPD:     g = bits 12-13 (3 invalid: gain 3, WRONG_GAIN_VALUE), adc = low 12 bits
#            E = (adc - Offset[c, g]) * gain[c, g]             (gain = RelativeGain x FFMap)
#   ePix100: E = (raw - Offset) -> common mode rows, then columns, per ASIC -> E * gain
#   mask = badpix[c, g]; E = 0 where mask != 0.


def _pick(table: np.ndarray, stage: np.ndarray) -> np.ndarray:
    """table (gains, ss, fs) at each pixel's stage (ss, fs)."""
    return np.take_along_axis(table, stage[None].astype(np.intp), axis=0)[0]


def correct_agipd_reference(analog, digital, cell, consts, out_data, out_gain, out_mask):
    """AGIPD in NumPy; ``analog``/``digital`` (n, ss, fs) uint16 (see the formulas above)."""
    for f in range(analog.shape[0]):
        c = int(cell[f])
        dig = digital[f].astype(np.float32)
        stage = np.where(dig > consts.thresholds[c, 0], 1, 0)
        stage = np.where(dig > consts.thresholds[c, 1], 2, stage)
        energy = (analog[f].astype(np.float32) - _pick(consts.offset[c], stage)) * _pick(
            consts.gain[c], stage
        )
        mask = _pick(consts.badpix[c], stage)
        out_data[f] = np.where(mask != 0, np.float32(0), energy)
        out_gain[f] = stage
        out_mask[f] = mask


def correct_lpd_reference(raw, cell, consts, out_data, out_gain, out_mask):
    """LPD in NumPy; ``raw`` (n, ss, fs) uint16."""
    for f in range(raw.shape[0]):
        c = int(cell[f])
        code = (raw[f] >> 12) & 3
        valid = code != 3
        stage = np.where(valid, code, 0)
        energy = ((raw[f] & 0xFFF).astype(np.float32) - _pick(consts.offset[c], stage)) * _pick(
            consts.gain[c], stage
        )
        mask = np.where(valid, _pick(consts.badpix[c], stage), np.uint32(BADPIX.WRONG_GAIN_VALUE))
        out_data[f] = np.where(mask != 0, np.float32(0), energy)
        out_gain[f] = code
        out_mask[f] = mask


def _median_or_zero(values: np.ndarray, keep: np.ndarray, axis: int) -> np.ndarray:
    """NaN-median of ``values`` where ``keep`` along ``axis``; 0 where nothing is kept."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(np.where(keep, values, np.float32(np.nan)), axis=axis, keepdims=True)
    return np.where(np.isnan(med), np.float32(0), med).astype(np.float32)


def _blocks(shape: tuple[int, int], block: tuple[int, int]):
    for r0 in range(0, shape[0], block[0]):
        for c0 in range(0, shape[1], block[1]):
            yield np.s_[r0 : r0 + block[0], c0 : c0 + block[1]]


def common_mode_asics_reference(data, gain, mask, block, stage, threshold):
    """Per block: subtract the median of good pixels in ``stage`` below ``threshold``."""
    for f in range(data.shape[0]):
        for sl in _blocks(data.shape[1:], block):
            d, g, m = data[f][sl], gain[f][sl], mask[f][sl]
            use = (m == 0) & (g == stage)
            keep = use & (d < np.float32(threshold))
            if keep.any():
                med = np.float32(np.median(d[keep]))
                d[use] -= med


def common_mode_lines_reference(data, mask, block, threshold):
    """Per block: rows, then columns, each minus the median of its good pixels below
    ``threshold`` (a line with none is left alone)."""
    thr = np.float32(threshold)
    for f in range(data.shape[0]):
        for sl in _blocks(data.shape[1:], block):
            d, good = data[f][sl], mask[f][sl] == 0
            d -= np.where(good, _median_or_zero(d, good & (d < thr), axis=1), np.float32(0))
            d -= np.where(good, _median_or_zero(d, good & (d < thr), axis=0), np.float32(0))


def correct_epix100_reference(raw, consts, out_data, out_gain, out_mask, common_mode, threshold):
    """ePix100 in NumPy; ``common_mode`` is the ASIC shape or None."""
    mask = consts.badpix[0, 0]
    energy = raw.astype(np.float32) - consts.offset[0, 0]
    out_data[:] = np.where(mask != 0, np.float32(0), energy)
    out_mask[:] = mask
    out_gain[:] = 0
    if common_mode is not None:
        common_mode_lines_reference(out_data, out_mask, common_mode, threshold)
    with np.errstate(invalid="ignore", over="ignore"):
        out_data[:] = np.where(mask != 0, np.float32(0), out_data * consts.gain[0, 0])


def photons_reference(data, mask, photon_energy, out):
    """int16 photon counts: rint(E / E_photon), clipped to int16, 0 for bad pixels."""
    inv = np.float32(1) / np.float32(photon_energy)
    counts = np.clip(np.rint(data * inv), -32768, 32767)
    counts = np.where(np.isnan(counts) | (mask != 0), 0, counts)
    out[:] = counts.astype(np.int16)
