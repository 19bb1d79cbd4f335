"""Pre-generated realistic raw trains for AGIPD, LPD and ePix100, drawn from their constants.

The counterpart of :class:`~calstream.ingest.simulate.JungfrauSimulation` for the other
registered detectors (:func:`~calstream.ingest.simulate.make_simulation` picks one). Each
module's frames are generated once (vectorised NumPy) from the module's constants in kernel
layout (:class:`~calstream.calibrate.DetectorConstants`), so a pipeline correcting them with
the same constants sees what a real detector gives:

* dark noise around the offset of the frame's memory cell (and gain stage),
* sparse photons (``photon`` output units each, Poisson positions),
* a few bright spots per frame whose core switches to medium or low gain (AGIPD: digital
  value between or above the thresholds T0/T1; LPD: gain bits 12-13 = 1 or 2),
* ePix100: a common-mode offset per ASIC row and frame (what its common-mode step removes).

Keys and axis orders are the registry's (file style unless ``style="online"``):
AGIPD ``image.data`` (frames, 2, 512, 128) analog + digital, or online ``image.data`` and
``image.gain``; LPD ``image.data`` (frames, 1, 256, 256); XTDF also ``image.cellId``,
``image.pulseId``, ``image.trainId`` (frames, 1) as the facility's raw files carry them;
ePix100 ``data.image.pixels`` (704, 768), one frame per train as the receiver sends it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from calstream.calibrate.registry import get_detector
from calstream.errors import ConfigError
from calstream.ingest.karabo_bridge import Data, Metadata

__all__ = ["DetectorSimulation"]

log = logging.getLogger(__name__)

#: Per detector: dark noise (ADU), photon size (output units), sparse photons per frame,
#: ADC ceiling, the signal (output units) above which a spot's pixel leaves G0 / G1.
_PROFILE: dict[str, dict[str, float]] = {
    "agipd": {"noise": 8.0, "photon": 60.0, "photons": 300, "adc_max": 0x3FFF,
              "g0_max": 7000.0, "g1_max": 150000.0},
    "lpd": {"noise": 4.0, "photon": 40.0, "photons": 300, "adc_max": 0xFFF,
            "g0_max": 2000.0, "g1_max": 20000.0},
    "epix100": {"noise": 6.0, "photon": 70.0, "photons": 1500, "adc_max": 0xFFFF,
                "g0_max": np.inf, "g1_max": np.inf},
}
_SPOTS_PER_FRAME = 2.0
_CM_ADU = 8.0  # ePix100 common-mode spread per ASIC row and frame


class DetectorSimulation:
    """Pre-generated raw trains of AGIPD, LPD or ePix100 modules.

    Parameters
    ----------
    detector
        ``"agipd"``, ``"lpd"`` or ``"epix100"``.
    constants
        Per module number: its constants in kernel layout (cells, gains, ss, fs).
    sources
        Per module number: the input source name the trains carry.
    cells
        Frames per train (memory cells 0 .. cells-1, in order); at most the constants' cells.
    style
        ``"file"`` (the registry's file layout) or ``"online"`` (AGIPD: separate
        ``image.gain``).
    n_distinct, seed
        Distinct trains per module (train ``tid`` reuses number ``tid % n_distinct``) and the
        random seed (each module draws from ``SeedSequence([seed, module])``).

    Raises
    ------
    ConfigError
        Unknown detector, constants of the wrong detector or too few cells, bad parameters.
    """

    def __init__(self, detector: str, *, constants: Mapping[int, Any],
                 sources: Mapping[int, str], cells: int, style: str = "file",
                 n_distinct: int = 2, seed: int = 0) -> None:
        spec = get_detector(detector)
        if spec.name not in _PROFILE:
            raise ConfigError(f"no detector simulation for {spec.name!r}; known: "
                              f"{', '.join(_PROFILE)}", key="detector")
        if style not in ("file", "online"):
            raise ConfigError(f"style must be 'file' or 'online'. Got {style!r}.", key="style")
        if not 1 <= cells <= spec.max_cells or n_distinct < 1:
            raise ConfigError(f"cells must be 1 to {spec.max_cells} and n_distinct >= 1. Got "
                              f"{cells} and {n_distinct}.", key="cells")
        if set(constants) != set(sources) or not sources:
            raise ConfigError("constants and sources must name the same modules", key="modules")
        self.spec = spec
        self.detector = spec.name
        self.modules = tuple(sorted(sources))
        self.sources = [sources[m] for m in self.modules]
        self.cells = cells if spec.max_cells > 1 else 1
        self.style = style
        self.n_distinct = n_distinct
        self.cell_ids = np.arange(self.cells, dtype=np.uint16)
        t0 = time.perf_counter()
        self._trains: list[list[dict[str, np.ndarray]]] = []
        for module in self.modules:
            consts = constants[module]
            if getattr(consts, "detector", None) != spec.name:
                raise ConfigError(f"constants of module {module} are not {spec.name} constants",
                                  key="constants")
            if consts.cells < self.cells and consts.cells != 1:
                raise ConfigError(f"constants of module {module} have {consts.cells} cells, "
                                  f"the simulation needs {self.cells}", key="cells")
            rng = np.random.default_rng(np.random.SeedSequence([seed, module]))
            self._trains.append([self._generate(consts, rng) for _ in range(n_distinct)])
        for per_module in self._trains:
            for arrays in per_module:
                for arr in arrays.values():
                    arr.flags.writeable = False
        self.nbytes_per_train = len(self.modules) * (
            sum(a.nbytes for a in self._trains[0][0].values()) + self.cells * 18)
        """Bytes of array data in one train (all modules), without protocol headers."""
        log.info("generated %d distinct %s trains for %d module(s), %d frames, in %.2f s",
                 n_distinct, spec.name, len(self.modules), self.cells, time.perf_counter() - t0)

    # -- generation ---------------------------------------------------------------------------

    def _generate(self, consts: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        prof = _PROFILE[self.detector]
        frames = self.cells
        ss, fs = self.spec.module_shape
        cell = np.minimum(np.arange(frames), consts.cells - 1)
        npix = ss * fs
        # Signal in output units per pixel (photons, spots); gain stage from its size.
        signal = np.zeros((frames, npix), np.float32)
        counts = rng.poisson(prof["photons"], frames)
        frame = np.repeat(np.arange(frames), counts)
        np.add.at(signal, (frame, rng.integers(0, npix, frame.size)), np.float32(prof["photon"]))
        for f in range(frames):
            for _ in range(rng.poisson(_SPOTS_PER_FRAME)):
                self._spot(signal[f].reshape(ss, fs), rng)
        stage = np.zeros(signal.shape, np.intp)
        if consts.gains > 1:
            stage[signal > prof["g0_max"]] = 1
            stage[signal > prof["g1_max"]] = 2
        # raw = offset[c, g] + signal / factor[c, g] + noise (factor: output units per ADU).
        offset = consts.offset[cell].reshape(frames, consts.gains, npix)
        gain = consts.gain[cell].reshape(frames, consts.gains, npix)
        off = np.take_along_axis(offset, stage[:, None], 1)[:, 0]
        fac = np.take_along_axis(gain, stage[:, None], 1)[:, 0]
        fac = np.where(np.isfinite(fac) & (fac != 0), fac, np.float32(1))
        off = np.where(np.isfinite(off), off, np.float32(0))
        noise = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(prof["noise"])
        adu = off + signal / fac + noise
        if self.detector == "epix100":
            adu += self._common_mode(frames, ss, fs, rng)
        np.rint(adu, out=adu)
        np.clip(adu, 0, prof["adc_max"], out=adu)
        raw = adu.astype(np.uint16).reshape(frames, ss, fs)
        stage = stage.reshape(frames, ss, fs)
        if self.detector == "agipd":
            digital = self._digital(consts, cell, stage, rng)
            if self.style == "online":
                return {"image.data": raw, "image.gain": digital}
            return {"image.data": np.ascontiguousarray(np.stack([raw, digital], axis=1))}
        if self.detector == "lpd":
            raw |= (stage.astype(np.uint16) << 12)
            return {"image.data": raw[:, None]}
        return {"data.image.pixels": raw[0]}

    @staticmethod
    def _spot(frame: np.ndarray, rng: np.random.Generator) -> None:
        """Add a gaussian blob of 10^3 to 10^5.5 output units at its peak."""
        ny, nx = frame.shape
        width = rng.uniform(1.0, 3.0)
        half = int(np.ceil(3 * width))
        cy, cx = int(rng.integers(0, ny)), int(rng.integers(0, nx))
        ys = slice(max(cy - half, 0), min(cy + half + 1, ny))
        xs = slice(max(cx - half, 0), min(cx + half + 1, nx))
        yy, xx = np.mgrid[ys, xs]
        peak = 10 ** rng.uniform(3.0, 5.5)
        frame[ys, xs] += (peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
                          ).astype(np.float32)

    @staticmethod
    def _digital(consts: Any, cell: np.ndarray, stage: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """AGIPD's digital value: below T0 in G0, between T0 and T1 in G1, above T1 in G2."""
        t0 = consts.thresholds[cell, 0]
        t1 = consts.thresholds[cell, 1]
        level = np.where(stage == 0, t0 - 300, np.where(stage == 1, (t0 + t1) / 2, t1 + 300))
        level += rng.standard_normal(level.shape, dtype=np.float32) * np.float32(10)
        level = np.where(np.isfinite(level), level, np.float32(0))
        return np.clip(np.rint(level), 0, 0x3FFF).astype(np.uint16)

    def _common_mode(self, frames: int, ss: int, fs: int,
                     rng: np.random.Generator) -> np.ndarray:
        """A common offset per ASIC row and frame (flat (frames, ss * fs))."""
        a_fs = self.spec.asic_shape[1]
        rows = rng.standard_normal((frames, ss, fs // a_fs), dtype=np.float32)
        rows *= np.float32(_CM_ADU)
        return np.repeat(rows, a_fs, axis=2).reshape(frames, ss * fs)

    # -- trains -------------------------------------------------------------------------------

    def train(self, train_id: int) -> tuple[Data, Metadata]:
        """The train ``train_id``: pre-generated read-only arrays, fresh metadata (and, for
        XTDF detectors, fresh ``image.trainId`` / ``image.pulseId``)."""
        from calstream.ingest.simulate import train_stamp

        stamp = train_stamp(train_id)
        data: Data = {}
        metadata: Metadata = {}
        xtdf = self.detector in ("agipd", "lpd")
        if xtdf:
            per_frame = {
                "image.cellId": self.cell_ids[:, None],
                "image.pulseId": np.arange(self.cells, dtype=np.uint64)[:, None],
                "image.trainId": np.full((self.cells, 1), train_id, np.uint64),
            }
        for source, distinct in zip(self.sources, self._trains, strict=True):
            props: dict[str, Any] = dict(distinct[train_id % self.n_distinct])
            if xtdf:
                props.update(per_frame)
            else:
                props["data.frameNumber"] = int(train_id)
            data[source] = props
            metadata[source] = {"source": source, **stamp}
        return data, metadata

    def __repr__(self) -> str:
        return (f"<DetectorSimulation {self.detector} modules={self.modules} "
                f"cells={self.cells} style={self.style!r}>")
