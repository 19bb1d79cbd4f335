"""One conformance suite over the AGIPD, LPD and ePix100 kernels, common mode and photon
counts, run on every backend (Numba, Cython, NumPy reference).

AGIPD and LPD are checked against an independent float64 oracle on the *unfolded* tables, so
the folding at load time is checked too; common mode and ePix100 against the NumPy reference
(whose medians are NumPy's) and hand-computed cases.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calstream.calibrate import (
    BACKENDS,
    BADPIX,
    DetectorConstants,
    get_detector,
    make_corrector,
)
from calstream.calibrate import numba_kernels as nk
from calstream.calibrate import reference as ref
from calstream.calibrate.detectors import empty_aligned
from calstream.calibrate.native import (
    common_mode_asics_cython,
    common_mode_lines_cython,
    correct_agipd_cython,
    correct_lpd_cython,
    native_available,
    native_unavailable_reason,
    photons_cython,
)
from calstream.errors import ConfigError, ConstantsError, DataError

BACKEND_PARAMS = [
    pytest.param(
        b,
        marks=pytest.mark.skipif(
            b == "cython" and not native_available(),
            reason=f"Cython kernels unavailable: {native_unavailable_reason()}",
        ),
    )
    for b in BACKENDS
]
NAN, RANGE = int(BADPIX.VALUE_IS_NAN), int(BADPIX.VALUE_OUT_OF_RANGE)
WRONG, THR = int(BADPIX.WRONG_GAIN_VALUE), int(BADPIX.GAIN_THRESHOLDING_ERROR)


def outs(shape, data_dtype=np.float32):
    return (
        np.full(shape, 12345, data_dtype),
        np.full(shape, 99, np.uint8),
        np.full(shape, 0xDEAD, np.uint32),
    )


def tables(rng, cells, gains, ss, fs, *, specials=True):
    shape = (cells, gains, ss, fs)
    offset = rng.uniform(0, 4000, shape).astype(np.float32)
    gain = rng.uniform(0.05, 20, shape).astype(np.float32)
    badpix = np.where(rng.random(shape) < 0.1, rng.choice([1, 2, 1 << 8, 1 << 31], shape), 0)
    if specials:
        offset[rng.random(shape) < 0.02] = np.nan
        offset[rng.random(shape) < 0.01] = np.inf
        gain[rng.random(shape) < 0.02] = np.nan
        gain[rng.random(shape) < 0.01] = -np.inf
        gain[rng.random(shape) < 0.03] = 0.0
    return offset, gain, badpix.astype(np.uint32)


def flags(offset, gain):
    bad = np.where(~np.isfinite(offset) | ~np.isfinite(gain), NAN, 0)
    return (bad | np.where(gain == 0, RANGE, 0)).astype(np.uint32)


def pick(table, c, stage):
    rows = np.arange(stage.shape[1])[None, :, None]
    cols = np.arange(stage.shape[2])[None, None, :]
    return table[np.asarray(c)[:, None, None], stage, rows, cols]


def check(result, expected, *, atol=1e-6):
    data, gain, mask = result
    exp_data, exp_gain, exp_mask = expected
    np.testing.assert_array_equal(gain, exp_gain)
    np.testing.assert_array_equal(mask, exp_mask)
    np.testing.assert_allclose(data, exp_data, rtol=1e-6, atol=atol)
    assert not np.signbit(data[mask != 0]).any(), "bad pixels must be +0.0"


# -- AGIPD -----------------------------------------------------------------------------------


def agipd_case(rng, n, ss, fs, cells, *, specials=True):
    offset, gain, badpix = tables(rng, cells, 3, ss, fs, specials=specials)
    t0 = rng.uniform(4000, 6000, (cells, ss, fs))
    thresholds = np.stack([t0, t0 + rng.uniform(500, 1500, t0.shape)], axis=1).astype(np.float32)
    if specials:
        thresholds[rng.random(thresholds.shape) < 0.01] = np.nan
    cell = rng.integers(0, cells, n)
    analog = rng.integers(0, 1 << 14, (n, ss, fs), dtype=np.uint16)
    analog[rng.random(analog.shape) < 0.03] = 0x3FFF  # saturated ADC
    analog[rng.random(analog.shape) < 0.01] = 0xFFFF
    # digital values on both sides of each threshold, and exactly on them
    t = thresholds[cell]
    level = rng.choice([0, 1, 2, 3, 4], (n, ss, fs), p=[0.5, 0.1, 0.2, 0.1, 0.1])
    t0v, t1v = np.nan_to_num(t[:, 0], nan=5000), np.nan_to_num(t[:, 1], nan=6000)
    digital = np.select(
        [level == 0, level == 1, level == 2, level == 3],
        [t0v - 300, np.floor(t0v), (t0v + t1v) / 2, np.ceil(t1v) + 1],
        t1v + 3000,
    ).clip(0, 65535).astype(np.uint16)
    return analog, digital, cell, offset, gain, badpix, thresholds


def agipd_oracle(analog, digital, cell, offset, gain, badpix, thresholds):
    thr_ok = np.isfinite(thresholds).all(axis=1)
    thr = np.where(thr_ok[:, None], thresholds, 0).astype(np.float64)
    thr[:, 1] = np.maximum(thr[:, 1], thr[:, 0])  # T1 below T0 counts as T0 (see facility.py)
    thr = thr[cell]
    dig = digital.astype(np.float64)
    stage = np.where(dig > thr[:, 0], 1, 0)
    stage = np.where(dig > thr[:, 1], 2, stage)
    off = pick(offset, cell, stage).astype(np.float64)
    g = pick(gain, cell, stage).astype(np.float64)
    mask = pick(badpix, cell, stage) | pick(flags(offset, gain), cell, stage)
    mask |= np.where(thr_ok[cell], 0, THR).astype(np.uint32)
    with np.errstate(all="ignore"):
        energy = (analog - off) * g
    return np.where(mask == 0, energy, 0), stage.astype(np.uint8), mask


def run_agipd(backend, consts, analog, digital, cell, *, file_layout):
    corrector = make_corrector("agipd", consts, backend, frame_shape=None)
    result = outs(analog.shape)
    if file_layout:
        image = np.stack([analog, digital], axis=1)
        corrector.correct_module({"image.data": image, "image.cellId": cell[:, None]}, *result)
    else:
        corrector.correct(analog, digital, cell, *result)
    return result


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("file_layout", [True, False])
@pytest.mark.parametrize("cells", [1, 4])
def test_agipd_random_against_oracle(backend, file_layout, cells) -> None:
    rng = np.random.default_rng(cells + file_layout)
    analog, digital, cell, offset, gain, badpix, thr = agipd_case(rng, 6, 16, 40, cells)
    consts = DetectorConstants.from_kernel("agipd", offset, gain, badpix, thr)
    result = run_agipd(backend, consts, analog, digital, cell, file_layout=file_layout)
    check(result, agipd_oracle(analog, digital, cell, offset, gain, badpix, thr), atol=1e-3)
    assert set(np.unique(result[1])) == {0, 1, 2}
    assert np.count_nonzero(result[2] & THR) and np.count_nonzero(result[2] & NAN)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 3),
    ss=st.integers(1, 4),
    fs=st.integers(1, 200),
    cells=st.sampled_from([1, 3]),
    file_layout=st.booleans(),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_agipd_hypothesis(backend, seed, n, ss, fs, cells, file_layout) -> None:
    rng = np.random.default_rng(seed)
    analog, digital, cell, offset, gain, badpix, thr = agipd_case(rng, n, ss, fs, cells)
    consts = DetectorConstants.from_kernel("agipd", offset, gain, badpix, thr)
    result = run_agipd(backend, consts, analog, digital, cell, file_layout=file_layout)
    check(result, agipd_oracle(analog, digital, cell, offset, gain, badpix, thr), atol=1e-3)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_agipd_hand_computed(backend) -> None:
    # 1 cell, 1 x 4 pixels: offsets 100/200/300, gains 2/3/4, T0 1000, T1 2000
    offset = np.broadcast_to(np.array([100, 200, 300.0])[None, :, None, None], (1, 3, 1, 4))
    gain = np.broadcast_to(np.array([2, 3, 4.0])[None, :, None, None], (1, 3, 1, 4)).copy()
    gain[0, 1, 0, 3] = 0.0  # G1 of pixel 3 unusable
    thr = np.broadcast_to(np.array([1000, 2000.0])[None, :, None, None], (1, 2, 1, 4))
    consts = DetectorConstants.from_kernel("agipd", offset, gain, None, thr)
    analog = np.array([[[500, 500, 500, 500]]], np.uint16)
    digital = np.array([[[1000, 1001, 2001, 1500]]], np.uint16)
    corrector = make_corrector("agipd", consts, backend, frame_shape=None)
    data, g, m = outs((1, 1, 4))
    corrector.correct(analog, digital, None, data, g, m)
    np.testing.assert_array_equal(data[0, 0], [800, 900, 800, 0])
    np.testing.assert_array_equal(g[0, 0], [0, 1, 2, 1])
    np.testing.assert_array_equal(m[0, 0], [0, 0, 0, RANGE])


# -- LPD -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("planes", [False, True])
def test_lpd_random_against_oracle(backend, planes) -> None:
    rng = np.random.default_rng(5 + planes)
    n, ss, fs, cells = 5, 8, 64, 3
    offset, gain, badpix = tables(rng, cells, 3, ss, fs)
    raw = rng.integers(0, 0x10000, (n, ss, fs), dtype=np.uint16)
    raw[rng.random(raw.shape) < 0.05] |= 0x0FFF  # saturated ADC in every gain
    cell = rng.integers(0, cells, n)
    consts = DetectorConstants.from_kernel("lpd", offset, gain, badpix)
    corrector = make_corrector("lpd", consts, backend, frame_shape=None)
    result = outs(raw.shape)
    image = raw[:, None] if planes else raw
    corrector.correct_module({"image.data": image, "image.cellId": cell}, *result)

    code = (raw >> 12) & 3
    stage = np.where(code == 3, 0, code)
    with np.errstate(all="ignore"):
        energy = ((raw & 0xFFF) - pick(offset, cell, stage).astype(np.float64)) * pick(
            gain, cell, stage
        )
    mask = np.where(code == 3, WRONG, pick(badpix, cell, stage) | pick(flags(offset, gain),
                                                                       cell, stage))  # fmt: skip
    check(result, (np.where(mask == 0, energy, 0), code.astype(np.uint8), mask), atol=1e-3)
    assert np.count_nonzero(result[2] == WRONG) > 0


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("name", ["agipd", "lpd"])
@pytest.mark.parametrize("aligned", [True, False])
def test_g0_blocks_streaming_and_not(backend, name, aligned) -> None:
    """Mostly-G0 frames take the G0-only path (non-temporal stores when aligned); the one
    block with a gain switch takes the general path. Both must match the oracle."""
    rng = np.random.default_rng(21)
    n, ss, fs, cells = 3, 16, 128, 2  # 4 blocks of 512 pixels per frame
    offset, gain, badpix = tables(rng, cells, 3, ss, fs, specials=False)
    cell = np.array([1, 0, 1])
    if name == "agipd":
        thr = np.stack([np.full((cells, ss, fs), 5000.0), np.full((cells, ss, fs), 6000.0)], 1)
        analog = rng.integers(0, 0x4000, (n, ss, fs), dtype=np.uint16)
        digital = np.full((n, ss, fs), 4000, np.uint16)
        digital[:, 9, 5] = 5500
        digital[:, 10, 6] = 6500
        consts = DetectorConstants.from_kernel("agipd", offset, gain, badpix, thr)
        expected = agipd_oracle(analog, digital, cell, offset, gain, badpix, thr.astype(np.float32))
        args = (analog, digital)
    else:
        raw = rng.integers(0, 0x1000, (n, ss, fs), dtype=np.uint16)
        raw[:, 9, 5] |= 0x1000
        raw[:, 10, 6] |= 0x3000
        consts = DetectorConstants.from_kernel("lpd", offset, gain, badpix)
        code = (raw >> 12) & 3
        stage = np.where(code == 3, 0, code)
        energy = ((raw & 0xFFF) - pick(offset, cell, stage).astype(np.float64)) * pick(
            gain, cell, stage
        )
        mask = np.where(code == 3, WRONG, pick(badpix, cell, stage))
        expected = (np.where(mask == 0, energy, 0), code.astype(np.uint8), mask)
        args = (raw, None)
    corrector = make_corrector(name, consts, backend, frame_shape=None)
    result = corrector.empty_outputs(n)
    if not aligned:
        result = tuple(
            empty_aligned((o.size + 1,), o.dtype)[1:].reshape(o.shape) for o in result
        )
    corrector.correct(*args, cell, *result)
    check(result, expected, atol=1e-3)


# -- common mode and ePix100 -----------------------------------------------------------------

CM = {
    "numba": (nk.common_mode_asics_numba, nk.common_mode_lines_numba),
    "cython": (common_mode_asics_cython, common_mode_lines_cython),
    "numpy": (ref.common_mode_asics_reference, ref.common_mode_lines_reference),
}


def cm_asics(backend, data, gain, mask, block, stage, threshold):
    if backend == "numpy":
        ref.common_mode_asics_reference(data, gain, mask, block, stage, threshold)
    else:
        scratch = np.empty(block[0] * block[1], np.float32)
        CM[backend][0](data, gain, mask, block, stage, threshold, scratch)


def cm_lines(backend, data, mask, block, threshold):
    if backend == "numpy":
        ref.common_mode_lines_reference(data, mask, block, threshold)
    else:
        CM[backend][1](data, mask, block, threshold, np.empty(nk.scratch_size(block), np.float32))


def cm_case(rng, n, ss, fs, block):
    """Per-block offsets, noise, photon hits, bad pixels, one all-bad block."""
    base = rng.normal(0, 30, (n, ss // block[0], fs // block[1])).astype(np.float32)
    data = np.repeat(np.repeat(base, block[0], axis=1), block[1], axis=2)
    data += rng.normal(0, 1, data.shape).astype(np.float32)
    data[rng.random(data.shape) < 0.05] += 500  # photons
    mask = np.where(rng.random(data.shape) < 0.05, 1, 0).astype(np.uint32)
    mask[:, : block[0], : block[1]] = 4  # an all-bad block
    gain = np.where(rng.random(data.shape) < 0.1, 1, 0).astype(np.uint8)
    return data, gain, mask


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_common_mode_asics(backend) -> None:
    rng = np.random.default_rng(1)
    block = (8, 8)
    data, gain, mask = cm_case(rng, 3, 16, 32, block)
    data[1, 8:16, 8:16] = 900  # every pixel a hit: nothing below the threshold, left alone
    expected = data.copy()
    ref.common_mode_asics_reference(expected, gain, mask, block, 0, 100.0)
    before = data.copy()
    cm_asics(backend, data, gain, mask, block, 0, 100.0)
    np.testing.assert_allclose(data, expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(data[:, :8, :8], before[:, :8, :8])  # all bad
    np.testing.assert_array_equal(data[1, 8:16, 8:16], 900)
    np.testing.assert_array_equal(data[gain != 0], before[gain != 0])  # other stage untouched
    # the per-block offset is gone from the good, quiet high-gain pixels
    quiet = (mask == 0) & (gain == 0) & (before < 100)
    quiet[:, :8, :8] = False
    quiet[1, 8:16, 8:16] = False
    assert np.abs(np.median(data[quiet])) < 0.5 and np.abs(data[quiet]).max() < 10


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_common_mode_lines(backend) -> None:
    rng = np.random.default_rng(2)
    block = (6, 10)
    data, _, mask = cm_case(rng, 2, 12, 20, block)
    data += rng.normal(0, 5, (2, 12, 1)).astype(np.float32)  # row-wise offsets
    data[0, 7, 10:20] = 800  # a row of hits
    expected = data.copy()
    ref.common_mode_lines_reference(expected, mask, block, 100.0)
    cm_lines(backend, data, mask, block, 100.0)
    np.testing.assert_allclose(data, expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_array_equal(data[mask != 0], expected[mask != 0])


@pytest.mark.parametrize("backend", ["numba", "cython"])
@given(
    values=st.lists(
        st.floats(-1e4, 1e4, width=32, allow_nan=False), min_size=1, max_size=40
    ),
    threshold=st.sampled_from([1e9, 0.0]),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_common_mode_median_matches_numpy(backend, values, threshold) -> None:
    """One block over the whole frame: the median must be NumPy's, for any count."""
    if backend == "cython" and not native_available():
        pytest.skip("Cython kernels unavailable")
    data = np.array(values, np.float32)[None, None, :]
    gain = np.zeros(data.shape, np.uint8)
    mask = np.zeros(data.shape, np.uint32)
    expected = data.copy()
    ref.common_mode_asics_reference(expected, gain, mask, (1, data.shape[2]), 0, threshold)
    cm_asics(backend, data, gain, mask, (1, data.shape[2]), 0, threshold)
    np.testing.assert_allclose(data, expected, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("common_mode", [True, False])
@pytest.mark.parametrize("aligned", [True, False])
def test_epix100_against_reference(backend, common_mode, aligned) -> None:
    rng = np.random.default_rng(9)
    ss, fs, block = 12, 96, (6, 48)  # 1152 pixels: two full blocks of 512 and a tail
    offset, gain, badpix = tables(rng, 1, 1, ss, fs)
    consts = DetectorConstants.from_kernel("epix100", offset, gain, badpix)
    raw = (np.nan_to_num(offset, posinf=0) + rng.normal(0, 3, (4, ss, fs)) + 30).clip(0, 65535)
    raw = raw.astype(np.uint16)[:, 0]
    raw[rng.random(raw.shape) < 0.05] = 0xFFFF  # saturated / hits
    corrector = make_corrector("epix100", consts, backend, frame_shape=None,
                               common_mode=common_mode, asic_shape=block)  # fmt: skip
    result = corrector.empty_outputs(raw.shape[0])  # aligned: the streaming-store path
    if not aligned:
        result = tuple(
            empty_aligned((o.size + 1,), o.dtype)[1:].reshape(o.shape) for o in result
        )
    corrector.correct_module({"data.image.pixels": raw}, *result)

    expected = outs(raw.shape)
    ref.correct_epix100_reference(raw, consts, *expected, block if common_mode else None, 50.0)
    check(result, expected, atol=1e-3)
    assert np.all(result[1] == 0)
    bad = (badpix[0, 0] | flags(offset, gain)[0, 0])
    np.testing.assert_array_equal(result[2], np.broadcast_to(bad, raw.shape))
    if common_mode:  # the +30 ADU pedestal is removed by the row/column medians
        good = (result[2] == 0) & (raw != 0xFFFF)
        assert np.abs(np.median(result[0][good] / np.broadcast_to(consts.factor[0, 0],
                                                                 raw.shape)[good])) < 3  # fmt: skip


# -- photon counts ---------------------------------------------------------------------------

PHOTONS = {
    "numba": nk.photons_numba,
    "cython": photons_cython,
    "numpy": ref.photons_reference,
}


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_photons(backend) -> None:
    data = np.array([[0.0, 4.9, 5.0, 7.5, 12.5, -5.0, -7.6, 1e9, -1e9, np.nan, 25.0, 30.0]],
                    np.float32)[None]  # fmt: skip
    mask = np.zeros(data.shape, np.uint32)
    mask[0, 0, -1] = 1
    out = np.full(data.shape, 77, np.int16)
    PHOTONS[backend](data, mask, 5.0, out)
    # round half to even: 1.5 -> 2, 2.5 -> 2; clipped; NaN and bad -> 0
    np.testing.assert_array_equal(out[0, 0], [0, 1, 1, 2, 2, -1, -2, 32767, -32768, 0, 5, 0])

    rng = np.random.default_rng(4)
    data = rng.normal(0, 200, (3, 7, 33)).astype(np.float32)
    mask = np.where(rng.random(data.shape) < 0.1, 2, 0).astype(np.uint32)
    expected, out = np.empty(data.shape, np.int16), np.empty(data.shape, np.int16)
    ref.photons_reference(data, mask, 9.3, expected)
    PHOTONS[backend](data, mask, 9.3, out)
    np.testing.assert_array_equal(out, expected)


def test_photons_rejects_bad_arguments() -> None:
    data = np.zeros((1, 2, 2), np.float32)
    mask = np.zeros((1, 2, 2), np.uint32)
    with pytest.raises(ValueError, match="int16"):
        nk.photons_numba(data, mask, 1.0, np.empty((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="positive"):
        nk.photons_numba(data, mask, 0.0, np.empty((1, 2, 2), np.int16))


# -- correctors ------------------------------------------------------------------------------


def small_agipd(cells=2, ss=16, fs=16):
    rng = np.random.default_rng(0)
    offset, gain, badpix = tables(rng, cells, 3, ss, fs, specials=False)
    thr = np.stack([np.full((cells, ss, fs), 5000), np.full((cells, ss, fs), 6000)], axis=1)
    return DetectorConstants.from_kernel("agipd", offset, gain, badpix, thr)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_photon_output_every_detector(backend) -> None:
    """With a photon energy, data is int16 counts of what float output would be."""
    rng = np.random.default_rng(3)
    for name in ("agipd", "lpd", "epix100"):
        gains = get_detector(name).gains
        offset, gain, badpix = tables(rng, 1, gains, 16, 16, specials=False)
        thr = np.broadcast_to(np.array([5e3, 6e3], np.float32)[None, :, None, None], (1, 2, 16, 16))
        consts = DetectorConstants.from_kernel(name, offset, gain, badpix,
                                               thr if name == "agipd" else None)  # fmt: skip
        raw = rng.integers(0, 4000, (3, 16, 16), dtype=np.uint16)
        args = (np.stack([raw, raw + 5000], axis=1), None) if name == "agipd" else (raw, None)
        options = {"common_mode": False} if name != "lpd" else {}
        floats = make_corrector(name, consts, backend, frame_shape=None, **options)
        counts = make_corrector(name, consts, backend, frame_shape=None, photon_energy=9.3,
                                **options)  # fmt: skip
        counts.warmup()
        f_out, c_out = floats.empty_outputs(3), counts.empty_outputs(3)
        assert c_out[0].dtype == np.int16 and counts.output_dtypes["data"] == np.int16
        floats.correct(*args, None, *f_out)
        counts.correct(*args, None, *c_out)
        expected = np.empty(raw.shape, np.int16)
        ref.photons_reference(f_out[0], f_out[2], 9.3, expected)
        np.testing.assert_array_equal(c_out[0], expected, err_msg=name)
        np.testing.assert_array_equal(c_out[2], f_out[2])
        assert np.all(c_out[0][c_out[2] != 0] == 0)


def test_jungfrau_photon_output() -> None:
    from calstream.calibrate import JungfrauConstants, JungfrauCorrector

    rng = np.random.default_rng(8)
    consts = JungfrauConstants.from_kernel(rng.normal(3000, 30, (1, 3, 4, 64)),
                                           np.full((1, 3, 4, 64), 40.0))  # fmt: skip
    adc = rng.integers(2000, 8000, (2, 4, 64), dtype=np.uint16)
    floats = JungfrauCorrector(consts, "numba", frame_shape=None)
    counts = JungfrauCorrector(consts, "numba", frame_shape=None, photon_energy=12.4)
    f_out, c_out = floats.empty_outputs(2), counts.empty_outputs(2)
    floats.correct(adc, None, None, *f_out)
    counts.correct(adc, None, None, *c_out)
    assert set(counts.output_dtypes) == {"adc", "gain", "mask"}
    np.testing.assert_array_equal(c_out[0], np.rint(f_out[0] / np.float32(12.4)).astype(np.int16))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_agipd_common_mode_in_corrector(backend) -> None:
    consts = small_agipd(cells=1, ss=128, fs=64)
    rng = np.random.default_rng(6)
    analog = (np.asarray(consts.offset[0, 0]) + 7 + rng.normal(0, 1, (2, 128, 64))).astype(
        np.uint16
    )
    digital = np.full(analog.shape, 100, np.uint16)
    plain = make_corrector("agipd", consts, backend, frame_shape=None)
    cm = make_corrector("agipd", consts, backend, frame_shape=None, common_mode=True,
                        cm_threshold=1e6)  # fmt: skip
    a, b = plain.empty_outputs(2), cm.empty_outputs(2)
    plain.correct(analog, digital, None, *a)
    cm.correct(analog, digital, None, *b)
    expected = a[0].copy()
    ref.common_mode_asics_reference(expected, a[1], a[2], (64, 64), 0, 1e6)
    np.testing.assert_allclose(b[0], expected, rtol=1e-6, atol=1e-3)
    assert abs(np.median(b[0][b[2] == 0])) < abs(np.median(a[0][a[2] == 0]))


def test_corrector_errors() -> None:
    consts = small_agipd()
    corrector = make_corrector("agipd", consts, "numba", frame_shape=None)
    data, gain, mask = corrector.empty_outputs(2)
    image = np.zeros((2, 2, 16, 16), np.uint16)
    where = {"source": "SPB_DET_AGIPD1M-1/DET/3CH0:xtdf", "train_id": 77}
    with pytest.raises(DataError, match=r"no 'image\.data'") as info:
        corrector.correct_module({"image.cellId": np.zeros(2)}, data, gain, mask, **where)
    assert info.value.train_id == 77
    with pytest.raises(DataError, match=r"memory cells \[5\] outside"):
        corrector.correct(image, None, np.array([[0], [5]]), data, gain, mask, **where)
    with pytest.raises(DataError, match="expected dtype uint16"):
        corrector.correct(image.astype(np.int32), None, np.array([0, 1]), data, gain, mask)
    with pytest.raises(DataError, match=r"expected shape \('frames', 2, 16, 16\)"):
        corrector.correct(image[:, :1], None, np.array([0, 1]), data, gain, mask)
    with pytest.raises(DataError, match=r"image\.gain"):
        corrector.correct(image[:, 0], np.zeros((2, 16, 15), np.uint16), np.array([0, 1]),
                          data, gain, mask)  # fmt: skip
    with pytest.raises(DataError, match=r"online style .* image\.gain must come with it"):
        corrector.correct_module({"image.data": image[:, 0], "image.cellId": np.zeros(2, int)},
                                 data, gain, mask)  # fmt: skip
    with pytest.raises(DataError, match="output buffer must be float32"):
        corrector.correct(image, None, np.array([0, 1]), data[:1], gain, mask)
    with pytest.raises(ConstantsError, match=r"frames of \(16, 16\), expected \(512, 128\)"):
        make_corrector("agipd", consts)
    with pytest.raises(ConstantsError, match="constants are for agipd, not lpd"):
        make_corrector("lpd", consts, frame_shape=None)
    with pytest.raises(ConfigError, match=r"unknown detector 'mythen'.*jungfrau, agipd, lpd"):
        make_corrector("mythen", consts)
    with pytest.raises(ConfigError, match="photon energy must be positive"):
        make_corrector("agipd", consts, frame_shape=None, photon_energy=-1)
    with pytest.raises(ConfigError, match="unknown calibration backend 'cuda'"):
        make_corrector("agipd", consts, "cuda", frame_shape=None)


@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_kernels_reject_inconsistent_arguments(backend) -> None:
    if backend == "cython" and not native_available():
        pytest.skip("Cython kernels unavailable")
    consts = small_agipd()
    agipd = nk.correct_agipd_numba if backend == "numba" else correct_agipd_cython
    lpd = nk.correct_lpd_numba if backend == "numba" else correct_lpd_cython
    raw = np.zeros((2, 16, 16), np.uint16)
    o = outs(raw.shape)
    t = (consts.thresholds, consts.offset, consts.factor, consts.badpix)
    with pytest.raises(ValueError, match="cell"):
        agipd(raw, 0, raw, 0, np.array([0, 2]), *t, *o)
    with pytest.raises(ValueError, match="plane"):
        agipd(raw, 0, raw, 1, np.array([0, 1]), *t, *o)
    with pytest.raises(ValueError, match="out_mask"):
        agipd(raw, 0, raw, 0, np.array([0, 1]), *t, *o[:2], o[2][:1])
    with pytest.raises(ValueError, match="offset"):
        lpd(raw, 0, np.array([0, 1]), consts.offset[:, :2], consts.factor, consts.badpix, *o)
    with pytest.raises(ValueError, match="do not tile"):
        cm_asics(backend, o[0], o[1], o[2], (5, 16), 0, 1.0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_two_threads_share_a_corrector(backend) -> None:
    """Workers call one corrector from several threads (per-thread scratch buffers)."""
    consts = small_agipd(cells=2, ss=64, fs=64)
    rng = np.random.default_rng(12)
    image = rng.integers(0, 7000, (8, 2, 64, 64), dtype=np.uint16)
    cells = np.arange(8) % 2
    corrector = make_corrector("agipd", consts, backend, frame_shape=None, common_mode=True,
                               photon_energy=2.0)  # fmt: skip
    expected = corrector.empty_outputs(8)
    corrector.correct(image, None, cells, *expected)
    result = corrector.empty_outputs(8)

    def half(sl: slice) -> None:
        for _ in range(3):
            corrector.correct(image[sl], None, cells[sl], *(o[sl] for o in result))

    threads = [threading.Thread(target=half, args=(s,)) for s in (slice(0, 4), slice(4, 8))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for a, b in zip(result, expected, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_empty_train(backend) -> None:
    """A train with no frames is valid input for every detector and option."""
    rng = np.random.default_rng(0)
    for name, raw_shape, options in (
        ("agipd", (0, 2, 64, 64), {"common_mode": True, "photon_energy": 1.0}),
        ("lpd", (0, 64, 64), {"photon_energy": 1.0}),
        ("epix100", (0, 64, 64), {"common_mode": True, "asic_shape": (32, 32)}),
        ("epix100", (0, 64, 64), {"common_mode": False}),
    ):
        gains = get_detector(name).gains
        offset, gain, badpix = tables(rng, 1, gains, 64, 64, specials=False)
        thr = np.zeros((1, 2, 64, 64)) if name == "agipd" else None
        consts = DetectorConstants.from_kernel(name, offset, gain, badpix, thr)
        corrector = make_corrector(name, consts, backend, frame_shape=None, **options)
        corrector.correct(np.zeros(raw_shape, np.uint16), None, None, *corrector.empty_outputs(0))
