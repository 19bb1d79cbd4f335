"""Facility constants for every registered detector: read, check, convert once, synthesise.

A constants file holds one HDF5 dataset ``<name>/data`` per constant, axes (fast_scan,
slow_scan, cell, gain), float32 or float64 (bad pixels: integers). :func:`load_constants`
reads the constants a detector's :class:`~calstream.calibrate.registry.DetectorSpec` names,
checks every shape against the detector and the number of cells (one :class:`ConstantsError`
naming the constant, the expected and the found shape), converts each once into the kernel
layout (cell, gain, slow_scan, fast_scan) float32 C-contiguous, and derives the tables the
kernels read (:class:`DetectorConstants`):

- ``offset`` per (cell, gain, pixel); non-finite entries become 0 and are flagged VALUE_IS_NAN,
- ``gain``: the multiplicative factor applied to ``raw - offset`` (see each ``derive_*``),
- ``factor``: ``gain`` where the pixel is good and 0 where it is bad (the kernels multiply by
  it, so a bad pixel is 0 with no test on the mask),
- ``badpix``: OR of the detector's bad-pixel constants for (cell, gain), plus VALUE_IS_NAN
  (NaN/inf offset or gain), VALUE_OUT_OF_RANGE (gain 0, or a divisor of 0) and
  GAIN_THRESHOLDING_ERROR (NaN/inf AGIPD threshold, all gains),
- ``thresholds`` (AGIPD only): (cell, 2, ss, fs) float32, T0 and T1.

JUNGFRAU keeps its own :class:`~calstream.calibrate.constants.JungfrauConstants` (a divisor
folded into ``inv_gain``); :func:`load_constants` returns one for ``"jungfrau"``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calstream.calibrate.constants import (
    BADPIX,
    JungfrauConstants,
    _fingerprint,
    _plain,
    _to_kernel_layout,
    synth_jungfrau_constants,
)
from calstream.errors import ConstantsError

if TYPE_CHECKING:
    from calstream.calibrate.registry import DetectorSpec

__all__ = [
    "AGIPD_G2_OVER_G1",
    "DetectorConstants",
    "derive_agipd",
    "derive_epix100",
    "derive_jungfrau",
    "derive_lpd",
    "load_constants",
    "synth_constants",
]

log = logging.getLogger(__name__)

#: Fixed low/medium gain ratio the facility uses for AGIPD's G2 relative gain.
AGIPD_G2_OVER_G1 = 4.48

@dataclass(frozen=True, eq=False)
class DetectorConstants:
    """Constants of one module in kernel layout (cell, gain, slow_scan, fast_scan).

    Build with :func:`load_constants` or :meth:`from_kernel`; the arrays are read-only.

    Attributes
    ----------
    detector : str
        Registry name.
    offset, gain, factor : np.ndarray
        float32 (cells, gains, ss, fs); ``factor`` is ``gain`` with 0 for bad pixels.
    badpix : np.ndarray
        uint32 (cells, gains, ss, fs); 0 is good.
    thresholds : np.ndarray or None
        float32 (cells, 2, ss, fs): AGIPD's T0, T1.
    cells : int
    provenance : dict
    """

    detector: str
    offset: np.ndarray
    gain: np.ndarray
    factor: np.ndarray
    badpix: np.ndarray
    thresholds: np.ndarray | None
    cells: int
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(slow_scan, fast_scan) of one frame."""
        return (int(self.offset.shape[2]), int(self.offset.shape[3]))

    @property
    def gains(self) -> int:
        return int(self.offset.shape[1])

    @property
    def nbytes(self) -> int:
        arrays = (self.offset, self.gain, self.factor, self.badpix, self.thresholds)
        return sum(a.nbytes for a in arrays if a is not None)

    @classmethod
    def from_kernel(
        cls,
        detector: str,
        offset: np.ndarray,
        gain: np.ndarray | None = None,
        badpix: np.ndarray | None = None,
        thresholds: np.ndarray | None = None,
        *,
        provenance: Mapping[str, Any] | None = None,
    ) -> DetectorConstants:
        """Build from kernel-layout arrays (cells, gains, ss, fs); copies them.

        ``gain`` defaults to 1, ``badpix`` to all good; ``thresholds`` (cells, 2, ss, fs) is
        required for AGIPD.
        """
        offset = np.array(offset, np.float32, order="C", copy=True)
        gain = (
            np.ones(offset.shape, np.float32)
            if gain is None
            else np.array(np.broadcast_to(gain, offset.shape), np.float32, order="C", copy=True)
        )
        badpix = (
            np.zeros(offset.shape, np.uint32)
            if badpix is None
            else np.array(np.broadcast_to(badpix, offset.shape), np.uint32, order="C", copy=True)
        )
        if offset.ndim != 4:
            raise ConstantsError(
                f"expected (cells, gains, ss, fs), found {offset.shape}", key="Offset"
            )
        if thresholds is not None:
            thresholds = np.array(thresholds, np.float32, order="C", copy=True)
            want = (offset.shape[0], 2, *offset.shape[2:])
            if thresholds.shape != want:
                raise ConstantsError(
                    f"expected shape {want}, found {thresholds.shape}", key="ThresholdsDark"
                )
        return _finish(detector, offset, gain, badpix, thresholds, dict(provenance or {}))


def _finish(
    detector: str,
    offset: np.ndarray,
    gain: np.ndarray,
    badpix: np.ndarray,
    thresholds: np.ndarray | None,
    provenance: dict[str, Any],
) -> DetectorConstants:
    """Flag unusable entries and fold the bad-pixel decision into ``factor`` (owns the arrays)."""
    off_bad = ~np.isfinite(offset)
    badpix[off_bad | ~np.isfinite(gain)] |= np.uint32(BADPIX.VALUE_IS_NAN)
    badpix[gain == 0] |= np.uint32(BADPIX.VALUE_OUT_OF_RANGE)
    offset[off_bad] = 0.0
    if thresholds is not None:
        thr_bad = ~np.isfinite(thresholds).all(axis=1)  # (cells, ss, fs)
        badpix |= np.where(thr_bad, np.uint32(BADPIX.GAIN_THRESHOLDING_ERROR), np.uint32(0))[
            :, None
        ]
        # A pixel with an unusable threshold is masked; both thresholds 0 put it in G2
        # consistently. T1 is raised to T0 where it lies below: the kernels skip a block
        # whose digital values are all at or below T0, which needs T0 <= T1.
        thresholds[np.broadcast_to(thr_bad[:, None], thresholds.shape)] = 0.0
        np.maximum(thresholds[:, 1], thresholds[:, 0], out=thresholds[:, 1])
    factor = np.where(badpix == 0, gain, np.float32(0)).astype(np.float32)
    for arr in (offset, gain, factor, badpix, thresholds):
        if arr is not None:
            arr.flags.writeable = False
    return DetectorConstants(
        detector=detector,
        offset=offset,
        gain=gain,
        factor=factor,
        badpix=badpix,
        thresholds=thresholds,
        cells=int(offset.shape[0]),
        provenance=provenance,
    )


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` in float32; 0 where ``den`` is finite but the quotient is not (den 0).

    A zero factor is flagged VALUE_OUT_OF_RANGE later; NaN stays NaN (VALUE_IS_NAN)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.divide(num, den, dtype=np.float32)
    q[np.isfinite(den) & np.isfinite(num) & ~np.isfinite(q)] = 0.0
    return q


def _pixel_median(arr: np.ndarray) -> np.ndarray:
    """NaN-median over the pixels of each leading index: (cells, ss, fs) -> (cells, 1, 1)."""
    flat = arr.reshape(arr.shape[0], -1)
    with np.errstate(all="ignore"), _quiet():
        med = np.nanmedian(np.where(np.isfinite(flat), flat, np.nan), axis=1)
    return med.astype(np.float32)[:, None, None]


class _quiet:
    """Silence nanmedian's all-NaN warning (such a cell is flagged VALUE_IS_NAN)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _badpix_or(
    arrays: Mapping[str, np.ndarray], names: tuple[str, ...], shape: tuple
) -> np.ndarray:
    out = np.zeros(shape, np.uint32)
    for name in names:
        if name in arrays:
            out |= np.broadcast_to(_to_kernel_layout(arrays[name], np.uint32), shape)
    return out


def derive_jungfrau(
    arrays: Mapping[str, np.ndarray], provenance: dict[str, Any], source: str | None
) -> JungfrauConstants:
    """JUNGFRAU: see :class:`~calstream.calibrate.constants.JungfrauConstants`."""
    return JungfrauConstants.from_facility(
        arrays["Offset10Hz"],
        arrays["RelativeGain10Hz"],
        arrays["BadPixelsDark10Hz"],
        arrays.get("BadPixelsFF10Hz"),
        provenance=provenance,
        source=source,
    )


def derive_agipd(
    arrays: Mapping[str, np.ndarray], provenance: dict[str, Any], source: str | None
) -> DetectorConstants:
    """AGIPD tables.

    - offset = ``Offset/data`` per (cell, gain);
    - T0, T1 = ``ThresholdsDark/data[..., 0]`` and ``[..., 1]``;
    - relative gain from ``SlopesPC/data`` (pulse-capacitor fit, 10 parameters on the gain
      axis): mH = ``[..., 0]`` (high-gain slope), mM = ``[..., 3]`` (medium-gain slope), and
      per cell the NaN-median of mH over the module's pixels, ref:
      ``rel[G0] = ref / mH``, ``rel[G1] = ref / mM``, ``rel[G2] = rel[G1] * 4.48``
      (1 for all without SlopesPC);
    - flat field from ``SlopesFF/data[..., 0]`` (s, per cell or one for all):
      ``ff = median(s) / s``, applied in every gain stage (1 without SlopesFF);
    - gain = rel * ff, so ``E = (analog - offset) * gain`` in units of high-gain ADU of the
      module's median pixel;
    - badpix = BadPixelsDark | BadPixelsPC | BadPixelsFF for (cell, gain).
    """
    offset = _to_kernel_layout(arrays["Offset"], np.float32)
    shape = offset.shape
    cells = shape[0]
    thresholds = _to_kernel_layout(arrays["ThresholdsDark"], np.float32)
    gain = np.ones(shape, np.float32)
    if "SlopesPC" in arrays:
        pc = _to_kernel_layout(arrays["SlopesPC"], np.float32)  # (cells, 2, ss, fs): mH, mM
        m_high, m_med = pc[:, 0], pc[:, 1]
        ref = _pixel_median(m_high)
        gain[:, 0] = _ratio(ref, m_high)
        gain[:, 1] = _ratio(ref, m_med)
        gain[:, 2] = gain[:, 1] * np.float32(AGIPD_G2_OVER_G1)
    if "SlopesFF" in arrays:
        slope = _to_kernel_layout(arrays["SlopesFF"], np.float32)[:, 0]  # (1 or cells, ss, fs)
        gain *= np.broadcast_to(_ratio(_pixel_median(slope), slope)[:, None], shape)
    badpix = _badpix_or(arrays, ("BadPixelsDark", "BadPixelsPC", "BadPixelsFF"), shape)
    del cells
    return _finish("agipd", offset, gain, badpix, thresholds, provenance)


def derive_lpd(
    arrays: Mapping[str, np.ndarray], provenance: dict[str, Any], source: str | None
) -> DetectorConstants:
    """LPD tables: offset = ``Offset``; gain = ``RelativeGain * FFMap`` (each 1 when absent;
    ``E = (adc - offset) * gain``); badpix = BadPixelsDark | BadPixelsFF for (cell, gain)."""
    offset = _to_kernel_layout(arrays["Offset"], np.float32)
    shape = offset.shape
    gain = np.ones(shape, np.float32)
    if "RelativeGain" in arrays:
        gain *= _to_kernel_layout(arrays["RelativeGain"], np.float32)
    if "FFMap" in arrays:
        gain *= np.broadcast_to(_to_kernel_layout(arrays["FFMap"], np.float32), shape)
    badpix = _badpix_or(arrays, ("BadPixelsDark", "BadPixelsFF"), shape)
    return _finish("lpd", offset, gain, badpix, None, provenance)


def derive_epix100(
    arrays: Mapping[str, np.ndarray], provenance: dict[str, Any], source: str | None
) -> DetectorConstants:
    """ePix100 tables: offset = ``OffsetEPix100``; gain = ``1 / RelativeGainEPix100`` (the
    facility divides by it; 1 when absent, a divisor of 0 is VALUE_OUT_OF_RANGE);
    badpix = ``BadPixelsDarkEPix100``."""
    offset = _to_kernel_layout(arrays["OffsetEPix100"], np.float32)
    gain = np.ones(offset.shape, np.float32)
    if "RelativeGainEPix100" in arrays:
        gain = _ratio(np.float32(1), _to_kernel_layout(arrays["RelativeGainEPix100"], np.float32))
    badpix = _badpix_or(arrays, ("BadPixelsDarkEPix100",), offset.shape)
    return _finish("epix100", offset, gain, badpix, None, provenance)


def _read(
    spec: DetectorSpec, path: Path, cells: int | None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import h5py

    src = str(path)
    ss, fs = spec.module_shape
    arrays: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            for const in spec.constants:
                name = const.name
                dpath = f"{name}/data"
                if dpath not in f:
                    if const.required:
                        raise ConstantsError(
                            f"constant {name} missing (no dataset {dpath!r})", source=src, key=name
                        )
                    continue
                dset = f[dpath]
                if not isinstance(dset, h5py.Dataset):
                    raise ConstantsError(f"{dpath!r} is not a dataset", source=src, key=name)
                shape = dset.shape
                if cells is None and const.per_cell and len(shape) == 4:
                    cells = shape[2]
                want_cells = "cells" if cells is None else str(cells)
                if not const.per_cell:
                    want_cells += " or 1"
                gains = " or ".join(map(str, const.gains))
                expected = (
                    f"(fast_scan, slow_scan, cell, gain) = ({fs}, {ss}, {want_cells}, {gains})"
                )
                cell_ok = len(shape) == 4 and (
                    shape[2] == cells or (not const.per_cell and shape[2] == 1)
                )
                if (
                    len(shape) != 4
                    or shape[:2] != (fs, ss)
                    or shape[3] not in const.gains
                    or not cell_ok
                ):
                    raise ConstantsError(
                        f"{name} has shape {shape}, expected {expected}", source=src, key=name
                    )
                kinds = "iub" if const.badpix else "fiub"
                if dset.dtype.kind not in kinds:
                    what = "an integer bit set" if const.badpix else "numeric"
                    raise ConstantsError(
                        f"{name} must be {what}, found dtype {dset.dtype}", source=src, key=name
                    )
                select = const.select
                if select is not None and shape[3] > max(select):
                    arrays[name] = dset[..., list(select)]
                else:
                    arrays[name] = dset[()]
    except ConstantsError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise ConstantsError(f"cannot read constants file: {exc}", source=src) from exc
    if cells is not None and cells > spec.max_cells:
        raise ConstantsError(
            f"{cells} cells, but {spec.name} has at most {spec.max_cells}", source=src
        )
    return arrays, attrs


def load_constants(
    detector: str,
    path: str | os.PathLike[str],
    *,
    cells: int | None = None,
) -> DetectorConstants | JungfrauConstants:
    """Load one module's constants for a registered detector from a facility-layout file.

    Parameters
    ----------
    detector
        Registry name (``"jungfrau"``, ``"agipd"``, ``"lpd"``, ``"epix100"``).
    path
        HDF5 file with the constants the detector's spec lists.
    cells
        Expected memory cells; ``None`` takes what the file has.

    Raises
    ------
    ConfigError
        Unknown detector.
    ConstantsError
        File missing or unreadable, a required constant missing, a shape that does not fit the
        detector or the cells (the message names the constant, expected and found shape).
    """
    from calstream.calibrate.registry import get_detector

    spec = get_detector(detector)
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise ConstantsError(f"constants file not found: {path}", source=src)
    arrays, attrs = _read(spec, path, cells)
    provenance = {
        "path": str(path.resolve()),
        "detector": spec.name,
        "constants": {name: f"{name}/data" for name in arrays},
        "file_attrs": attrs,
        **_fingerprint(path),
    }
    if spec.derive is None:
        raise ConstantsError(f"no constants derivation registered for {spec.name}", source=src)
    consts = spec.derive(arrays, provenance, src)
    log.info(
        "loaded %s constants %s: %d cells, %d bad (cell, gain, pixel) entries",
        spec.name, path, consts.cells, int(np.count_nonzero(consts.badpix)),
    )  # fmt: skip
    return consts


# -- synthetic constants ---------------------------------------------------------------------

#: (mean, sd) per gain stage of the synthetic float constants, per detector.
_SYNTH: dict[str, dict[str, list[tuple[float, float]]]] = {
    "agipd": {
        "Offset": [(5000, 150), (5400, 150), (5600, 150)],
        "ThresholdsDark": [(5900, 30), (6900, 30), (4500, 20), (6400, 20), (7400, 20)],
        "SlopesPC": [(20, 1), (0, 10), (1, 0.1), (0.75, 0.04), (0, 10),
                     (1, 0.1), (0, 1), (0, 1), (0, 1), (0, 1)],
        "SlopesFF": [(8.0, 0.3), (0, 1)],
    },
    "lpd": {
        "Offset": [(1500, 100), (1600, 100), (1700, 100)],
        "RelativeGain": [(1.0, 0.03), (10.0, 0.3), (100.0, 3.0)],
        "FFMap": [(1.0, 0.02)],
    },
    "epix100": {
        "OffsetEPix100": [(2500, 100)],
        "RelativeGainEPix100": [(1.0, 0.02)],
    },
}


def synth_constants(
    detector: str,
    path: str | os.PathLike[str],
    *,
    cells: int | None = None,
    seed: int = 0,
    frame_shape: tuple[int, int] | None = None,
    dtype: Any = np.float32,
) -> Path:
    """Write realistic synthetic constants of one module in the facility layout.

    Per-pixel normal values (plus a small per-cell spread) for every constant the detector's
    spec lists, about 0.5 % bad pixels in each bad-pixel constant. ``cells`` defaults to 16
    (1 for ePix100); ``frame_shape`` to the module. JUNGFRAU delegates to
    :func:`~calstream.calibrate.constants.synth_jungfrau_constants`. Returns the path.
    """
    import h5py

    from calstream.calibrate.registry import get_detector

    spec = get_detector(detector)
    if cells is None:
        cells = min(16, spec.max_cells)
    if not 1 <= cells <= spec.max_cells:
        raise ValueError(f"{spec.name} has 1 to {spec.max_cells} cells, got {cells}")
    ss, fs = frame_shape or spec.module_shape
    if spec.name == "jungfrau":
        return synth_jungfrau_constants(path, cells=cells, seed=seed, frame_shape=(ss, fs))
    rng = np.random.default_rng(seed)
    path = Path(path)
    datasets: dict[str, np.ndarray] = {}
    whole_bad = rng.random((fs, ss)) < 0.004
    for const in spec.constants:
        n_cells = cells if const.per_cell else 1
        if const.badpix:
            gains = const.gains[-1]
            arr = np.zeros((fs, ss, n_cells, gains), np.uint32)
            if "Dark" in const.name:
                arr[whole_bad] = np.uint32(BADPIX.OFFSET_OUT_OF_THRESHOLD)
            single = rng.random(arr.shape) < 0.001
            arr[single] |= np.uint32(
                BADPIX.FF_GAIN_DEVIATION if "FF" in const.name else BADPIX.NOISE_OUT_OF_THRESHOLD
            )
        else:
            stats = _SYNTH[spec.name][const.name]
            gains = len(stats) if len(stats) in const.gains else const.gains[-1]
            arr = np.empty((fs, ss, n_cells, gains), dtype)
            for g, (mean, sd) in enumerate(stats[:gains]):
                pixel = rng.standard_normal((fs, ss, 1), dtype=np.float32) * np.float32(sd)
                cell = rng.standard_normal((fs, ss, n_cells), dtype=np.float32)
                arr[..., g] = pixel + cell * np.float32(sd / 20) + np.float32(mean)
        datasets[const.name] = arr
    now = _dt.datetime.now(_dt.UTC).isoformat()
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["creator"] = "calstream.calibrate.synth_constants"
        f.attrs["detector_type"] = spec.name
        f.attrs["creation_time"] = now
        f.attrs["seed"] = seed
        f.attrs["memory_cells"] = cells
        f.attrs["axes"] = "fast_scan, slow_scan, cell, gain"
        for name, arr in datasets.items():
            dset = f.create_dataset(f"{name}/data", data=arr)
            dset.attrs["synthetic"] = True
            f[name].attrs["begin_validity_at"] = now
    return path
