"""JUNGFRAU constants: facility layout in, kernel layout (with the folded tables) out."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from calstream.calibrate import (
    BADPIX,
    JungfrauConstants,
    load_jungfrau_constants,
    synth_jungfrau_constants,
)
from calstream.errors import ConstantsError

SMALL = (8, 16)  # (slow_scan, fast_scan)


def write_constants(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["creator"] = "test"
        for name, arr in arrays.items():
            f.create_dataset(f"{name}/data", data=arr)
    return path


def facility_arrays(cells: int = 2, shape: tuple[int, int] = SMALL, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ss, fs = shape
    full = (fs, ss, cells, 3)
    return {
        "Offset10Hz": rng.normal(3000, 300, full).astype(np.float32),
        "RelativeGain10Hz": rng.normal(40, 2, full).astype(np.float32),
        "BadPixelsDark10Hz": np.where(rng.random(full) < 0.1, 1, 0).astype(np.uint32),
        "BadPixelsFF10Hz": np.where(rng.random(full) < 0.1, 1 << 8, 0).astype(np.uint32),
    }


def test_badpix_bits_follow_the_facility() -> None:
    assert BADPIX.OFFSET_OUT_OF_THRESHOLD == 1
    assert BADPIX.VALUE_IS_NAN == 1 << 11
    assert BADPIX.VALUE_OUT_OF_RANGE == 1 << 12
    assert BADPIX.WRONG_GAIN_VALUE == 1 << 21
    assert BADPIX.NON_STANDARD_SIZE == 1 << 22
    assert BADPIX.USER2 == 1 << 31
    assert len({int(b) for b in BADPIX}) == len(BADPIX)  # no aliases


def test_load_converts_to_kernel_layout(tmp_path: Path) -> None:
    arrays = facility_arrays(cells=3)
    path = write_constants(tmp_path / "c.h5", arrays)
    consts = load_jungfrau_constants(path, expected_shape=SMALL)

    assert consts.cells == 3
    assert consts.frame_shape == SMALL
    for arr, dtype in (
        (consts.offset, np.float32),
        (consts.rel_gain, np.float32),
        (consts.inv_gain, np.float32),
        (consts.badpix, np.uint32),
    ):
        assert arr.shape == (3, 3, *SMALL)
        assert arr.dtype == dtype
        assert arr.flags.c_contiguous
        assert not arr.flags.writeable
    # kernel[c, g, ss, fs] == facility[fs, ss, c, g]
    np.testing.assert_array_equal(consts.offset, arrays["Offset10Hz"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(consts.rel_gain, arrays["RelativeGain10Hz"].transpose(2, 3, 1, 0))
    bad = (arrays["BadPixelsDark10Hz"] | arrays["BadPixelsFF10Hz"]).transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(consts.badpix, bad)
    # the bad-pixel decision is folded into the inverse gain
    expected_inv = np.where(bad == 0, np.float32(1) / consts.rel_gain, 0)
    np.testing.assert_array_equal(consts.inv_gain, expected_inv)
    assert np.all(consts.inv_gain[bad != 0] == 0)


def test_load_float64_and_without_ff(tmp_path: Path) -> None:
    arrays = facility_arrays(cells=1)
    del arrays["BadPixelsFF10Hz"]
    arrays["Offset10Hz"] = arrays["Offset10Hz"].astype(np.float64) + 0.1
    path = write_constants(tmp_path / "c.h5", arrays)
    consts = load_jungfrau_constants(path, cells=1, expected_shape=SMALL)
    assert consts.offset.dtype == np.float32
    np.testing.assert_array_equal(
        consts.offset, arrays["Offset10Hz"].transpose(2, 3, 1, 0).astype(np.float32)
    )
    np.testing.assert_array_equal(consts.badpix, arrays["BadPixelsDark10Hz"].transpose(2, 3, 1, 0))
    assert "BadPixelsFF10Hz" not in consts.provenance["constants"]


def test_nan_and_zero_constants_are_flagged(tmp_path: Path) -> None:
    arrays = facility_arrays(cells=1)
    arrays["BadPixelsDark10Hz"][:] = 0
    arrays["BadPixelsFF10Hz"][:] = 0
    arrays["Offset10Hz"][0, 0, 0, 0] = np.nan
    arrays["Offset10Hz"][1, 0, 0, 1] = np.inf
    arrays["RelativeGain10Hz"][2, 0, 0, 0] = np.nan
    arrays["RelativeGain10Hz"][3, 0, 0, 2] = -np.inf
    arrays["RelativeGain10Hz"][4, 0, 0, 1] = 0.0
    arrays["RelativeGain10Hz"][5, 0, 0, 1] = 1e-40  # subnormal: 1/g overflows float32
    path = write_constants(tmp_path / "c.h5", arrays)
    c = load_jungfrau_constants(path, expected_shape=SMALL)

    nan, out_of_range = BADPIX.VALUE_IS_NAN, BADPIX.VALUE_OUT_OF_RANGE
    assert c.badpix[0, 0, 0, 0] == nan and c.offset[0, 0, 0, 0] == 0.0
    assert c.badpix[0, 1, 0, 1] == nan and c.offset[0, 1, 0, 1] == 0.0
    assert c.badpix[0, 0, 0, 2] == nan
    assert c.badpix[0, 2, 0, 3] == nan
    assert c.badpix[0, 1, 0, 4] == out_of_range
    assert c.badpix[0, 1, 0, 5] == out_of_range
    assert np.count_nonzero(c.badpix) == 6
    assert np.all(np.isfinite(c.offset)) and np.all(np.isfinite(c.inv_gain))
    assert np.all(c.inv_gain[c.badpix != 0] == 0)


def test_provenance(tmp_path: Path) -> None:
    path = write_constants(tmp_path / "c.h5", facility_arrays())
    c = load_jungfrau_constants(path, expected_shape=SMALL)
    prov = c.provenance
    assert prov["path"] == str(path.resolve())
    assert prov["constants"]["Offset10Hz"] == "Offset10Hz/data"
    assert prov["file_attrs"]["creator"] == "test"
    assert prov["size"] == path.stat().st_size
    assert len(prov["sha256_first_mib"]) == 64


def test_missing_file() -> None:
    with pytest.raises(ConstantsError, match="constants file not found") as info:
        load_jungfrau_constants("/nonexistent/constants.h5")
    assert info.value.source == "/nonexistent/constants.h5"


def test_not_an_hdf5_file(tmp_path: Path) -> None:
    path = tmp_path / "c.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(ConstantsError, match="cannot read constants file"):
        load_jungfrau_constants(path)


@pytest.mark.parametrize("name", ["Offset10Hz", "RelativeGain10Hz", "BadPixelsDark10Hz"])
def test_missing_constant(tmp_path: Path, name: str) -> None:
    arrays = facility_arrays()
    del arrays[name]
    path = write_constants(tmp_path / "c.h5", arrays)
    with pytest.raises(ConstantsError, match=f"constant {name} missing") as info:
        load_jungfrau_constants(path, expected_shape=SMALL)
    assert info.value.key == name
    assert info.value.source == str(path)


def test_wrong_shape_names_constant_and_shapes(tmp_path: Path) -> None:
    arrays = facility_arrays()
    arrays["RelativeGain10Hz"] = arrays["RelativeGain10Hz"][:, :4]
    path = write_constants(tmp_path / "c.h5", arrays)
    with pytest.raises(ConstantsError) as info:
        load_jungfrau_constants(path, expected_shape=SMALL)
    msg = str(info.value)
    assert "RelativeGain10Hz" in msg and "(16, 4, 2, 3)" in msg and "(16, 8, cells, 3)" in msg
    assert info.value.key == "RelativeGain10Hz"


def test_module_shape_is_the_default(tmp_path: Path) -> None:
    path = write_constants(tmp_path / "c.h5", facility_arrays())
    with pytest.raises(ConstantsError, match=r"expected .*\(1024, 512, cells, 3\)"):
        load_jungfrau_constants(path)


def test_cells_mismatch(tmp_path: Path) -> None:
    path = write_constants(tmp_path / "c.h5", facility_arrays(cells=2))
    with pytest.raises(ConstantsError, match="cells mismatch: Offset10Hz has 2 cells, expected 16"):
        load_jungfrau_constants(path, cells=16, expected_shape=SMALL)

    arrays = facility_arrays(cells=2)
    arrays["BadPixelsDark10Hz"] = arrays["BadPixelsDark10Hz"][:, :, :1]
    path = write_constants(tmp_path / "d.h5", arrays)
    with pytest.raises(ConstantsError, match="cells mismatch") as info:
        load_jungfrau_constants(path, expected_shape=SMALL)
    assert info.value.key == "BadPixelsDark10Hz"


def test_non_integer_badpix_rejected(tmp_path: Path) -> None:
    arrays = facility_arrays()
    arrays["BadPixelsDark10Hz"] = arrays["BadPixelsDark10Hz"].astype(np.float32)
    path = write_constants(tmp_path / "c.h5", arrays)
    with pytest.raises(ConstantsError, match="integer") as info:
        load_jungfrau_constants(path, expected_shape=SMALL)
    assert info.value.key == "BadPixelsDark10Hz"


def test_from_kernel_checks_shapes() -> None:
    off = np.zeros((2, 3, 4, 5), np.float32)
    with pytest.raises(ConstantsError, match="RelativeGain"):
        JungfrauConstants.from_kernel(off, np.ones((2, 3, 4, 6), np.float32))
    with pytest.raises(ConstantsError, match="Offset"):
        JungfrauConstants.from_kernel(np.zeros((2, 2, 4, 5)), np.ones((2, 2, 4, 5)))
    c = JungfrauConstants.from_kernel(off, np.full((2, 3, 4, 5), 4.0))
    assert c.cells == 2 and not c.badpix.any()
    assert np.all(c.inv_gain == 0.25)


def test_synth_small_round_trip(tmp_path: Path) -> None:
    path = synth_jungfrau_constants(tmp_path / "s.h5", cells=4, seed=3, frame_shape=SMALL)
    c = load_jungfrau_constants(path, cells=4, expected_shape=SMALL)
    assert c.provenance["file_attrs"]["seed"] == 3
    again = load_jungfrau_constants(
        synth_jungfrau_constants(tmp_path / "t.h5", cells=4, seed=3, frame_shape=SMALL),
        expected_shape=SMALL,
    )
    np.testing.assert_array_equal(c.offset, again.offset)  # seeded: reproducible


def test_synth_module_values_are_realistic(tmp_path: Path) -> None:
    path = synth_jungfrau_constants(tmp_path / "s.h5", cells=1, seed=0)
    c = load_jungfrau_constants(path, cells=1)
    assert c.offset.shape == (1, 3, 512, 1024)
    good = c.badpix == 0
    for g, (off, off_sd, gain, gain_sd) in enumerate(
        [(3000, 300, 40, 2), (14000, 400, -1.5, 0.05), (15000, 400, -0.1, 0.005)]
    ):
        offsets = c.offset[0, g][good[0, g]]
        gains = c.rel_gain[0, g][good[0, g]]
        assert abs(offsets.mean() - off) < 5 and abs(offsets.std() - off_sd) < 10
        assert abs(gains.mean() - gain) < gain_sd / 10 and abs(gains.std() - gain_sd) < gain_sd / 10
    bad_fraction = np.count_nonzero(c.badpix) / c.badpix.size
    assert 0.003 < bad_fraction < 0.01
    bits = np.bitwise_or.reduce(c.badpix.ravel())
    assert bits & BADPIX.NOISE_OUT_OF_THRESHOLD and bits & BADPIX.FF_GAIN_DEVIATION
    assert not bits & (BADPIX.VALUE_IS_NAN | BADPIX.VALUE_OUT_OF_RANGE)
