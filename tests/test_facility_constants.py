"""Facility constants for every registered detector: synth -> load round trip, the derived
tables, and one clear error per mis-shaped or missing constant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from calstream.calibrate import (
    BADPIX,
    JungfrauConstants,
    detector_names,
    get_detector,
    load_constants,
    make_corrector,
    synth_constants,
)
from calstream.calibrate.facility import AGIPD_G2_OVER_G1
from calstream.errors import ConfigError, ConstantsError

CALSTREAM = str(Path(sys.executable).parent / "calstream")
CELLS = {"jungfrau": 1, "agipd": 2, "lpd": 2, "epix100": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("facility")
    return {
        name: synth_constants(name, root / f"{name}.h5", cells=CELLS[name], seed=1)
        for name in ("agipd", "lpd", "epix100")
    }


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {name: f[f"{name}/data"][()] for name in f}


def rewrite(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        for name, arr in arrays.items():
            f.create_dataset(f"{name}/data", data=arr)
    return path


def test_registry_lists_four_detectors_and_rejects_unknown() -> None:
    assert detector_names() == ("jungfrau", "agipd", "lpd", "epix100")
    assert get_detector("AGIPD").module_shape == (512, 128)
    assert get_detector("lpd").max_cells == 512 and get_detector("agipd").max_cells == 352
    assert get_detector("epix100").module_shape == (704, 768)
    with pytest.raises(ConfigError, match=r"unknown detector 'pnccd'; known detectors: "
                                          r"jungfrau, agipd, lpd, epix100"):  # fmt: skip
        get_detector("pnccd")
    for name in detector_names():
        spec = get_detector(name)
        assert spec.file_layout.keys["data"] in spec.file_layout.axes
        assert set(spec.output_keys) == {"data", "gain", "mask"}
        assert any(c.required for c in spec.constants)


@pytest.mark.parametrize("name", ["agipd", "lpd", "epix100"])
def test_synth_then_load_gives_kernel_layout(files, name) -> None:
    spec = get_detector(name)
    consts = load_constants(name, files[name])
    ss, fs = spec.module_shape
    assert consts.cells == CELLS[name] and consts.frame_shape == (ss, fs)
    for arr, dtype in ((consts.offset, np.float32), (consts.factor, np.float32),
                       (consts.badpix, np.uint32)):  # fmt: skip
        assert arr.shape == (CELLS[name], spec.gains, ss, fs) and arr.dtype == dtype
        assert arr.flags.c_contiguous and not arr.flags.writeable
    raw = read(files[name])
    off_name = spec.constants[0].name
    np.testing.assert_array_equal(consts.offset, raw[off_name].transpose(2, 3, 1, 0))
    assert np.all(consts.factor[consts.badpix != 0] == 0)
    assert 0.002 < np.count_nonzero(consts.badpix) / consts.badpix.size < 0.02
    assert consts.provenance["detector"] == name
    make_corrector(name, consts)  # module shape accepted


def test_agipd_derivation(files) -> None:
    raw = read(files["agipd"])
    c = load_constants("agipd", files["agipd"], cells=2)
    k = {name: arr.transpose(2, 3, 1, 0) for name, arr in raw.items()}  # kernel layout
    np.testing.assert_array_equal(c.thresholds, k["ThresholdsDark"][:, :2])
    m_high, m_med = k["SlopesPC"][:, 0], k["SlopesPC"][:, 3]
    ref = np.median(m_high.reshape(2, -1), axis=1)[:, None, None]
    s = k["SlopesFF"][:, 0]  # one cell
    ff = np.median(s) / s
    np.testing.assert_allclose(c.gain[:, 0], ref / m_high * ff, rtol=1e-6)
    np.testing.assert_allclose(c.gain[:, 1], ref / m_med * ff, rtol=1e-6)
    np.testing.assert_allclose(c.gain[:, 2], ref / m_med * AGIPD_G2_OVER_G1 * ff, rtol=1e-6)
    bad = k["BadPixelsDark"] | k["BadPixelsPC"] | k["BadPixelsFF"]
    np.testing.assert_array_equal(c.badpix, bad)


def test_lpd_and_epix_derivation(files) -> None:
    raw = {n: {k: v.transpose(2, 3, 1, 0) for k, v in read(files[n]).items()}
           for n in ("lpd", "epix100")}  # fmt: skip
    lpd = load_constants("lpd", files["lpd"])
    np.testing.assert_allclose(lpd.gain, raw["lpd"]["RelativeGain"] * raw["lpd"]["FFMap"],
                               rtol=1e-7)  # fmt: skip
    np.testing.assert_array_equal(lpd.badpix, raw["lpd"]["BadPixelsDark"]
                                  | raw["lpd"]["BadPixelsFF"])  # fmt: skip
    epix = load_constants("epix100", files["epix100"])
    np.testing.assert_allclose(epix.gain, 1 / raw["epix100"]["RelativeGainEPix100"], rtol=1e-7)


def test_float64_and_optional_constants(tmp_path, files) -> None:
    arrays = read(files["lpd"])
    del arrays["RelativeGain"], arrays["FFMap"], arrays["BadPixelsFF"]
    arrays["Offset"] = arrays["Offset"].astype(np.float64) + 0.25
    c = load_constants("lpd", rewrite(tmp_path / "l.h5", arrays))
    assert c.offset.dtype == np.float32 and np.all(c.gain == 1)
    np.testing.assert_array_equal(
        c.offset, arrays["Offset"].transpose(2, 3, 1, 0).astype(np.float32)
    )
    assert set(c.provenance["constants"]) == {"Offset", "BadPixelsDark"}


def test_zero_and_nan_constants_are_flagged(tmp_path, files) -> None:
    arrays = read(files["epix100"])
    arrays["BadPixelsDarkEPix100"][:] = 0
    arrays["RelativeGainEPix100"][0, 0, 0, 0] = 0.0
    arrays["OffsetEPix100"][1, 0, 0, 0] = np.nan
    c = load_constants("epix100", rewrite(tmp_path / "e.h5", arrays))
    assert c.badpix[0, 0, 0, 0] == BADPIX.VALUE_OUT_OF_RANGE and c.factor[0, 0, 0, 0] == 0
    assert c.badpix[0, 0, 0, 1] == BADPIX.VALUE_IS_NAN and c.offset[0, 0, 0, 1] == 0
    assert np.count_nonzero(c.badpix) == 2


@pytest.mark.parametrize(
    ("name", "constant", "cut", "expected"),
    [
        ("agipd", "Offset", np.s_[:, :256], r"\(128, 512, 2, 3\)"),
        ("agipd", "SlopesPC", np.s_[..., :5], r"\(128, 512, 2, 10\)"),
        ("agipd", "BadPixelsPC", np.s_[:, :, :1], r"\(128, 512, 2, 3\)"),
        ("lpd", "FFMap", np.s_[:10], r"\(256, 256, 2 or 1, 1 or 3\)"),
        ("epix100", "OffsetEPix100", np.s_[:100], r"\(768, 704, 1, 1\)"),
    ],
)
def test_wrong_shape_names_constant_expected_and_found(
    tmp_path, files, name, constant, cut, expected
) -> None:
    arrays = read(files[name])
    arrays[constant] = arrays[constant][cut]
    path = rewrite(tmp_path / "c.h5", arrays)
    with pytest.raises(ConstantsError, match=expected) as info:
        load_constants(name, path, cells=CELLS[name])
    assert info.value.key == constant and info.value.source == str(path)
    assert constant in str(info.value) and str(arrays[constant].shape) in str(info.value)


def test_missing_and_mismatched(tmp_path, files) -> None:
    arrays = read(files["agipd"])
    del arrays["ThresholdsDark"]
    with pytest.raises(ConstantsError, match="constant ThresholdsDark missing") as info:
        load_constants("agipd", rewrite(tmp_path / "a.h5", arrays))
    assert info.value.key == "ThresholdsDark"
    with pytest.raises(ConstantsError, match=r"Offset has shape \(128, 512, 2, 3\), expected .*"
                                             r"\(128, 512, 4, 3\)"):  # fmt: skip
        load_constants("agipd", files["agipd"], cells=4)
    with pytest.raises(ConstantsError, match="constants file not found"):
        load_constants("lpd", tmp_path / "none.h5")
    bad = read(files["lpd"])
    bad["BadPixelsDark"] = bad["BadPixelsDark"].astype(np.float32)
    with pytest.raises(ConstantsError, match="integer bit set") as info:
        load_constants("lpd", rewrite(tmp_path / "b.h5", bad))
    assert info.value.key == "BadPixelsDark"


def test_jungfrau_through_the_registry(tmp_path) -> None:
    path = synth_constants("jungfrau", tmp_path / "j.h5", cells=1, frame_shape=(512, 1024))
    c = load_constants("jungfrau", path, cells=1)
    assert isinstance(c, JungfrauConstants) and c.frame_shape == (512, 1024)
    make_corrector("jungfrau", c)


@pytest.mark.parametrize("name", ["agipd", "lpd", "epix100"])
def test_cli_synth_every_detector(tmp_path, name) -> None:
    out = tmp_path / f"{name}.h5"
    cmd = [CALSTREAM, "constants", "synth", "--detector", name, "-o", str(out)]
    if name != "epix100":
        cmd += ["--cells", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote synthetic {name} constants" in proc.stdout
    c = load_constants(name, out)
    assert c.cells == (1 if name == "epix100" else 3)


def test_cli_synth_rejects_too_many_cells(tmp_path) -> None:
    proc = subprocess.run(
        [CALSTREAM, "constants", "synth", "--detector", "epix100", "--cells", "2", "-o",
         str(tmp_path / "x.h5")], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "epix100 has 1 to 1 memory cells. Got 2" in proc.stderr
