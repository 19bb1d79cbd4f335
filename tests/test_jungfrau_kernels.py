"""One conformance suite over the JUNGFRAU backends (Numba, Cython, NumPy reference).

Expected values come from an independent float64 oracle written from the facility formula on
the *unfolded* constants, so the folding done at load time is checked too.
"""

from __future__ import annotations

import sys
import threading
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import calstream
from calstream.calibrate import BACKENDS, BADPIX, JungfrauConstants, JungfrauCorrector
from calstream.calibrate import native as native_mod
from calstream.calibrate.detectors import empty_aligned
from calstream.calibrate.kernels import correct_jungfrau_numba
from calstream.calibrate.native import correct_jungfrau_cython, native_available
from calstream.calibrate.reference import correct_jungfrau_reference
from calstream.errors import ConfigError, ConstantsError, DataError

NO_CYTHON = f"Cython kernels unavailable: {native_mod.native_unavailable_reason()}"
BACKEND_PARAMS = [
    pytest.param(
        b, marks=pytest.mark.skipif(b == "cython" and not native_available(), reason=NO_CYTHON)
    )
    for b in BACKENDS
]
WRONG = int(BADPIX.WRONG_GAIN_VALUE)


def run(backend, adc, gain, cell, consts, outs=None):
    """Call one backend's kernel directly; returns (data, gain, mask)."""
    if outs is None:
        outs = (
            np.full(adc.shape, np.nan, np.float32),
            np.full(adc.shape, 99, np.uint8),
            np.full(adc.shape, 0xDEAD, np.uint32),
        )
    tables = (consts.offset, consts.inv_gain, consts.badpix)
    if backend == "numba":
        correct_jungfrau_numba(adc, gain, cell, *tables, *outs)
    elif backend == "cython":
        correct_jungfrau_cython(adc, gain, cell, *tables, *outs)
    else:
        correct_jungfrau_reference(adc, gain, cell, consts, *outs)
    return outs


def oracle(adc, gain, cell, offset, rel_gain, badpix):
    """float64 facility formula on raw kernel-layout tables (offset, rel_gain, badpix)."""
    code = (adc >> 14) if gain is None else gain.astype(np.int64)
    stage = np.select([code == 0, code == 1, code == 3], [0, 1, 2], -1)
    valid = stage >= 0
    idx = np.where(valid, stage, 0)
    rows = np.arange(adc.shape[1])[None, :, None]
    cols = np.arange(adc.shape[2])[None, None, :]
    c = np.asarray(cell)[:, None, None]
    off = offset[c, idx, rows, cols].astype(np.float64)
    g = rel_gain[c, idx, rows, cols].astype(np.float64)
    bad = badpix[c, idx, rows, cols].astype(np.uint32)
    with np.errstate(all="ignore"):
        bad = bad | np.where(~np.isfinite(off) | ~np.isfinite(g), BADPIX.VALUE_IS_NAN, 0)
        bad = bad | np.where(np.isfinite(g) & (np.abs(g) < 1.2e-38), BADPIX.VALUE_OUT_OF_RANGE, 0)
        energy = ((adc & 0x3FFF) - off) / g
    mask = np.where(valid, bad, WRONG).astype(np.uint32)
    data = np.where(mask == 0, energy, 0.0)
    out_gain = np.where(valid, stage, 3).astype(np.uint8)
    return data, out_gain, mask


def random_case(rng, n, ss, fs, cells, mode, *, specials=True, g0_fraction=0.5):
    """Random raw tables (kernel layout) and data with every gain code and edge value."""
    table = (cells, 3, ss, fs)
    offset = rng.uniform(-100, 16000, table).astype(np.float32)
    rel_gain = (rng.choice([-1, 1], table) * rng.uniform(0.01, 100, table)).astype(np.float32)
    badpix = np.where(rng.random(table) < 0.1, rng.choice([1, 2, 1 << 8, 1 << 31], table), 0)
    if specials:
        offset[rng.random(table) < 0.015] = np.nan
        offset[rng.random(table) < 0.005] = -np.inf
        for value, frac in ((np.nan, 0.03), (np.inf, 0.01), (0.0, 0.03)):
            rel_gain[rng.random(table) < frac] = value
    adc = rng.integers(0, 0x4000, (n, ss, fs), dtype=np.uint16)
    adc[rng.random(adc.shape) < 0.05] = 0x3FFF  # saturation
    adc[rng.random(adc.shape) < 0.05] = 0
    codes = rng.choice([0, 1, 2, 3], adc.shape, p=[g0_fraction, *(3 * [(1 - g0_fraction) / 3])])
    if mode == "bits":
        adc |= (codes << 14).astype(np.uint16)
        gain = None
    else:
        adc[rng.random(adc.shape) < 0.05] |= 0xC000  # stray high bits: ignored in array mode
        codes[rng.random(adc.shape) < 0.02] = rng.choice([4, 17, 255])  # invalid codes
        gain = codes.astype(np.uint8)
    cell = rng.integers(0, cells, n)
    return adc, gain, cell, offset, rel_gain, badpix.astype(np.uint32)


def check(result, expected):
    data, gain, mask = result
    exp_data, exp_gain, exp_mask = expected
    np.testing.assert_array_equal(gain, exp_gain)
    np.testing.assert_array_equal(mask, exp_mask)
    np.testing.assert_allclose(data, exp_data, rtol=1e-6, atol=1e-6)
    assert not np.signbit(data[mask != 0]).any(), "bad pixels must be +0.0"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("mode", ["bits", "array"])
@pytest.mark.parametrize("cells", [1, 16])
def test_random_against_oracle(backend: str, mode: str, cells: int) -> None:
    rng = np.random.default_rng(cells + len(mode))
    # 1600 pixels a frame: three full blocks and a tail; low gain-switch rate so that some
    # blocks are all G0 (fast path) and others are not.
    adc, gain, cell, offset, rel_gain, badpix = random_case(
        rng, 20, 16, 100, cells, mode, g0_fraction=0.9995
    )
    adc[::3, :, 50:60] |= 0x4000 if mode == "bits" else 0
    if gain is not None:
        gain[::3, :, 50:60] = 1
    consts = JungfrauConstants.from_kernel(offset, rel_gain, badpix)
    result = run(backend, adc, gain, cell, consts)
    check(result, oracle(adc, gain, cell, offset, rel_gain, badpix))
    assert set(np.unique(result[1])) >= {0, 1}


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 4),
    ss=st.integers(1, 5),
    fs=st.integers(1, 150),
    cells=st.sampled_from([1, 2, 16]),
    mode=st.sampled_from(["bits", "array"]),
    g0_fraction=st.sampled_from([1.0, 0.999, 0.5, 0.0]),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hypothesis_against_oracle(backend, seed, n, ss, fs, cells, mode, g0_fraction) -> None:
    rng = np.random.default_rng(seed)
    adc, gain, cell, offset, rel_gain, badpix = random_case(
        rng, n, ss, fs, cells, mode, g0_fraction=g0_fraction
    )
    consts = JungfrauConstants.from_kernel(offset, rel_gain, badpix)
    check(run(backend, adc, gain, cell, consts), oracle(adc, gain, cell, offset, rel_gain, badpix))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_hand_computed_values(backend: str) -> None:
    # 2 cells, 1 x 8 pixels; offset 100*(g+1) + 10*c, gain (g+1) * 2 (G1, G2 negative)
    g = np.arange(3)[None, :, None, None]
    c = np.arange(2)[:, None, None, None]
    offset = np.broadcast_to(100.0 * (g + 1) + 10 * c, (2, 3, 1, 8)).astype(np.float32)
    rel_gain = np.broadcast_to(np.array([2.0, -4.0, -6.0])[None, :, None, None], (2, 3, 1, 8))
    badpix = np.zeros((2, 3, 1, 8), np.uint32)
    badpix[1, 0, 0, 3] = BADPIX.NOISE_OUT_OF_THRESHOLD
    badpix[1, 2, 0, 4] = BADPIX.FF_GAIN_DEVIATION
    rel_gain = rel_gain.copy()
    rel_gain[1, 1, 0, 5] = 0.0
    consts = JungfrauConstants.from_kernel(offset, rel_gain.astype(np.float32), badpix)

    value = np.array([300, 300, 1000, 300, 300, 300, 0x3FFF, 300], np.uint16)
    codes = np.array([0, 1, 3, 0, 3, 1, 0, 2], np.uint16)
    adc = (value | (codes << 14)).astype(np.uint16).reshape(1, 1, 8)
    data, gain, mask = run(backend, adc, None, np.array([1]), consts)

    # cell 1: offsets G0 110, G1 210, G2 310
    expected = [(300 - 110) / 2, (300 - 210) / -4, (1000 - 310) / -6, 0, 0, 0,
                (0x3FFF - 110) / 2, 0]  # fmt: skip
    np.testing.assert_allclose(data[0, 0], expected, rtol=1e-7)
    np.testing.assert_array_equal(gain[0, 0], [0, 1, 2, 0, 2, 1, 0, 3])
    np.testing.assert_array_equal(
        mask[0, 0],
        [0, 0, 0, BADPIX.NOISE_OUT_OF_THRESHOLD, BADPIX.FF_GAIN_DEVIATION,
         BADPIX.VALUE_OUT_OF_RANGE, 0, BADPIX.WRONG_GAIN_VALUE],
    )  # fmt: skip

    # the same through the gain array (codes 0, 1, 3; 2 invalid)
    data2, gain2, mask2 = run(backend, adc & 0x3FFF, codes.astype(np.uint8).reshape(1, 1, 8),
                              np.array([1]), consts)  # fmt: skip
    np.testing.assert_array_equal(data2, data)
    np.testing.assert_array_equal(gain2, gain)
    np.testing.assert_array_equal(mask2, mask)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_read_only_inputs_and_aligned_or_not_outputs(backend: str) -> None:
    """ZeroMQ frames give read-only arrays; aligned outputs take the streaming-store path."""
    rng = np.random.default_rng(7)
    adc, gain, cell, offset, rel_gain, badpix = random_case(
        rng, 4, 8, 128, 2, "bits", g0_fraction=0.9999
    )
    consts = JungfrauConstants.from_kernel(offset, rel_gain, badpix)
    for arr in (adc, cell):
        arr.flags.writeable = False
    expected = oracle(adc, gain, cell, offset, rel_gain, badpix)
    aligned = tuple(empty_aligned(adc.shape, dt) for dt in (np.float32, np.uint8, np.uint32))
    check(run(backend, adc, gain, cell, consts, aligned), expected)
    # misaligned by one element
    shifted = tuple(
        empty_aligned((adc.size + 1,), dt)[1:].reshape(adc.shape)
        for dt in (np.float32, np.uint8, np.uint32)
    )
    check(run(backend, adc, gain, cell, consts, shifted), expected)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_full_module_two_threads(backend: str) -> None:
    """One full-size 512 x 1024 check, run as two threads on halves of the frames."""
    rng = np.random.default_rng(11)
    cells = 4
    adc, gain, cell, offset, rel_gain, badpix = random_case(
        rng, 4, 512, 1024, cells, "bits", specials=False, g0_fraction=0.9999
    )
    adc[:, 200:220, 300:340] |= 0xC000
    consts = JungfrauConstants.from_kernel(offset, rel_gain, badpix)
    corrector = JungfrauCorrector(consts, backend)
    outs = corrector.empty_outputs(4)

    def half(sl: slice) -> None:
        corrector.correct(adc[sl], None, cell[sl], *(o[sl] for o in outs))

    threads = [threading.Thread(target=half, args=(s,)) for s in (slice(0, 2), slice(2, 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(outs, oracle(adc, gain, cell, offset, rel_gain, badpix))


def test_backends_agree_on_float32_rounding() -> None:
    """Kernels multiply by the folded inverse; the reference divides: within 1e-6."""
    rng = np.random.default_rng(3)
    adc, gain, cell, offset, rel_gain, badpix = random_case(rng, 3, 16, 64, 2, "bits")
    consts = JungfrauConstants.from_kernel(offset, rel_gain, badpix)
    ref = run("numpy", adc, gain, cell, consts)
    backends = ["numba"] + (["cython"] if native_available() else [])
    for backend in backends:
        data, g, m = run(backend, adc, gain, cell, consts)
        np.testing.assert_array_equal(g, ref[1])
        np.testing.assert_array_equal(m, ref[2])
        np.testing.assert_allclose(data, ref[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_kernel_rejects_inconsistent_arguments(backend: str) -> None:
    if backend == "cython" and not native_available():
        pytest.skip(NO_CYTHON)
    consts = JungfrauConstants.from_kernel(np.zeros((2, 3, 2, 8)), np.ones((2, 3, 2, 8)))
    adc = np.zeros((2, 2, 8), np.uint16)
    outs = [np.empty((2, 2, 8), dt) for dt in (np.float32, np.uint8, np.uint32)]
    kernel = correct_jungfrau_numba if backend == "numba" else correct_jungfrau_cython
    tables = (consts.offset, consts.inv_gain, consts.badpix)
    with pytest.raises(ValueError, match="cell"):
        kernel(adc, None, np.array([0, 2]), *tables, *outs)
    with pytest.raises(ValueError, match="out_mask"):
        kernel(adc, None, np.array([0, 1]), *tables, *outs[:2], np.empty((1, 2, 8), np.uint32))
    with pytest.raises(ValueError, match="gain"):
        kernel(adc, np.zeros((2, 2, 7), np.uint8), np.array([0, 1]), *tables, *outs)


# -- JungfrauCorrector: validation, cells, backends ------------------------------------------


@pytest.fixture
def small_consts() -> JungfrauConstants:
    rng = np.random.default_rng(5)
    return JungfrauConstants.from_kernel(
        rng.normal(3000, 300, (16, 3, 4, 8)), rng.normal(40, 2, (16, 3, 4, 8))
    )


def make_outs(n: int, shape=(4, 8)):
    return [np.empty((n, *shape), dt) for dt in (np.float32, np.uint8, np.uint32)]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_corrector_maps_memory_cells(backend: str, small_consts: JungfrauConstants) -> None:
    corrector = JungfrauCorrector(small_consts, backend, frame_shape=None)
    corrector.warmup()
    adc = np.full((3, 4, 8), 3100, np.uint16)
    memory_cells = np.array([15, 0, 7], np.uint8)
    outs = make_outs(3)
    corrector.correct(adc, None, memory_cells, *outs, source="JNGFR01", train_id=5)
    for f, c in enumerate(memory_cells):
        expected = (3100 - small_consts.offset[c, 0]) / small_consts.rel_gain[c, 0]
        np.testing.assert_allclose(outs[0][f], expected, rtol=1e-6)

    one_cell = JungfrauConstants.from_kernel(small_consts.offset[:1], small_consts.rel_gain[:1])
    corrector = JungfrauCorrector(one_cell, backend, frame_shape=None)
    corrector.correct(adc, None, np.array([3, 200, 15]), *outs)  # ignored with one cell
    np.testing.assert_allclose(
        outs[0], np.broadcast_to(
            (3100 - one_cell.offset[0, 0]) / one_cell.rel_gain[0, 0], (3, 4, 8)
        ), rtol=1e-6,
    )  # fmt: skip
    corrector.correct(adc, None, None, *outs)


def test_corrector_rejects_bad_inputs(small_consts: JungfrauConstants) -> None:
    corrector = JungfrauCorrector(small_consts, "numba", frame_shape=None)
    adc = np.zeros((2, 4, 8), np.uint16)
    cells = np.array([0, 1])
    where = {"source": "SPB/DET/JNGFR01:daqOutput", "train_id": 1234}

    def bad(match: str, key: str, *args, outs=None) -> None:
        with pytest.raises(DataError, match=match) as info:
            corrector.correct(*args, *(outs or make_outs(2)), **where)
        err = info.value
        assert err.key == key and err.train_id == 1234 and err.source == where["source"]
        assert "JNGFR01" in str(err) and "1234" in str(err) and key in str(err)

    bad("expected dtype uint16, found float32", "data.adc", adc.astype(np.float32), None, cells)
    bad(r"expected shape \('frames', 4, 8\), found \(2, 4, 9\)", "data.adc",
        np.zeros((2, 4, 9), np.uint16), None, cells)  # fmt: skip
    bad("numpy array", "data.adc", [[1]], None, cells)
    bad("expected dtype uint8", "data.gain", adc, np.zeros((2, 4, 8), np.int8), cells)
    bad(r"expected shape \(2, 4, 8\)", "data.gain", adc, np.zeros((1, 4, 8), np.uint8), cells)
    bad(r"memory cells \[16, 99\] outside", "data.memoryCell", adc, None, np.array([16, 99]))
    bad("integer array of shape", "data.memoryCell", adc, None, np.array([0, 1, 2]))
    bad("integer array of shape", "data.memoryCell", adc, None, np.array([0.0, 1.0]))
    bad("required", "data.memoryCell", adc, None, None)
    outs = make_outs(2)
    bad("float32", "out_data", adc, None, cells, outs=[outs[0].astype(np.float64), *outs[1:]])
    bad("uint32", "out_mask", adc, None, cells, outs=[*outs[:2], outs[2][:1]])
    strided = np.empty((2, 4, 16), np.float32)[:, :, ::2]
    bad("C-contiguous", "out_data", adc, None, cells, outs=[strided, *outs[1:]])


def test_corrector_accepts_non_contiguous_input(small_consts: JungfrauConstants) -> None:
    corrector = JungfrauCorrector(small_consts, "numba", frame_shape=None)
    adc = np.full((2, 4, 16), 3100, np.uint16)[:, :, ::2]
    outs = make_outs(2)
    corrector.correct(adc, None, np.array([0, 1]), *outs)
    np.testing.assert_allclose(
        outs[0][1], (3100 - small_consts.offset[1, 0]) / small_consts.rel_gain[1, 0], rtol=1e-6
    )


def test_corrector_config_errors(small_consts, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ConfigError, match=r"unknown calibration backend 'cuda'.*numba, cython, numpy"
    ):
        JungfrauCorrector(small_consts, "cuda", frame_shape=None)
    with pytest.raises(ConstantsError, match=r"frames of \(4, 8\), expected \(512, 1024\)"):
        JungfrauCorrector(small_consts)
    monkeypatch.setattr(native_mod, "_load", lambda: (None, "not built here"))
    with pytest.raises(ConfigError, match=r"needs the compiled extension.*not built here"):
        JungfrauCorrector(small_consts, "cython", frame_shape=None)


def test_output_dtypes_and_aligned_outputs(small_consts: JungfrauConstants) -> None:
    corrector = JungfrauCorrector(small_consts, "numpy", frame_shape=None)
    assert corrector.output_dtypes == {
        "adc": np.dtype(np.float32), "gain": np.dtype(np.uint8), "mask": np.dtype(np.uint32)
    }  # fmt: skip
    for arr, dtype in zip(
        corrector.empty_outputs(3), corrector.output_dtypes.values(), strict=True
    ):
        assert arr.shape == (3, 4, 8) and arr.dtype == dtype
        assert arr.ctypes.data % 64 == 0 and arr.flags.c_contiguous and arr.flags.writeable


# -- the extension switch ----------------------------------------------------------------------


def test_no_extensions_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALSTREAM_NO_EXTENSIONS", "1")
    native_mod._load.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # switched off on purpose: no warning
            assert not native_mod.native_available()
        assert "CALSTREAM_NO_EXTENSIONS" in native_mod.native_unavailable_reason()
        with pytest.raises(RuntimeError, match="unavailable"):
            correct_jungfrau_cython(*([None] * 9))
    finally:
        native_mod._load.cache_clear()


def test_missing_extension_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALSTREAM_NO_EXTENSIONS", raising=False)
    monkeypatch.setitem(sys.modules, "calstream._native", None)
    monkeypatch.delattr(calstream, "_native", raising=False)
    native_mod._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="calstream._native") as record:
            assert not native_mod.native_available()
            assert not native_mod.native_available()
            assert not native_mod.stream_stores()
        assert len(record) == 1
    finally:
        native_mod._load.cache_clear()
