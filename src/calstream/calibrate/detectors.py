"""Per-detector correction front ends: validate a train's arrays, pick the constants cell of
each frame, call the chosen kernel backend, then optional common mode and photon counts.

Every corrector has the same surface (:class:`Corrector`)::

    corrector = make_corrector("agipd", constants, backend="numba", photon_energy=9.3)
    data, gain, mask = corrector.empty_outputs(frames)
    corrector.correct_module(module_data, data, gain, mask, source=..., train_id=...)

``correct_module`` takes a source's data dict as it arrives (file-style or online-style keys
and axis orders, from the detector's registry entry); ``correct(raw, gain, cells, ...)`` takes
the arrays themselves.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np

from calstream.calibrate import numba_kernels as nk
from calstream.calibrate import reference as ref
from calstream.calibrate.constants import MODULE_SHAPE, JungfrauConstants
from calstream.calibrate.facility import DetectorConstants
from calstream.calibrate.kernels import correct_jungfrau_numba, warmup_numba
from calstream.calibrate.native import (
    common_mode_asics_cython,
    correct_agipd_cython,
    correct_epix100_cython,
    correct_jungfrau_cython,
    correct_lpd_cython,
    native_available,
    native_unavailable_reason,
    photons_cython,
)
from calstream.calibrate.reference import correct_jungfrau_reference
from calstream.calibrate.registry import DetectorSpec, get_detector
from calstream.errors import ConfigError, ConstantsError, DataError

__all__ = [
    "BACKENDS",
    "AgipdCorrector",
    "Corrector",
    "Epix100Corrector",
    "JungfrauCorrector",
    "LpdCorrector",
    "empty_aligned",
    "make_corrector",
]

log = logging.getLogger(__name__)

#: Kernel implementations, fastest first in the usual case; all give the same results.
BACKENDS = ("numba", "cython", "numpy")

_ALIGN = 64
_MODULE = object()  # default frame_shape: the detector's module


def empty_aligned(shape: tuple[int, ...], dtype: Any, align: int = _ALIGN) -> np.ndarray:
    """``np.empty`` whose data starts on an ``align``-byte boundary (cache line / AVX-512)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + align, np.uint8)
    start = -buf.ctypes.data % align
    return buf[start : start + nbytes].view(dtype).reshape(shape)


def _photons_numpy(data, mask, photon_energy, out):
    ref.photons_reference(data, mask, photon_energy, out)


_PHOTONS: dict[str, Callable[..., None]] = {
    "numba": nk.photons_numba,
    "cython": photons_cython,
    "numpy": _photons_numpy,
}


class Corrector:
    """What every detector's corrector shares: backend choice, frame shape, outputs, memory
    cells, input checks, and the photon-count output.

    Parameters
    ----------
    constants
        Module constants in kernel layout (:func:`~calstream.calibrate.load_constants`).
    backend
        One of :data:`BACKENDS`.
    frame_shape
        Required (slow_scan, fast_scan) of the constants: the detector's module by default,
        ``None`` accepts any (tests with small constants).
    photon_energy
        When set (in the units of the corrected data, keV for facility constants), ``data``
        is int16 photon counts ``rint(E / photon_energy)`` clipped to int16, 0 for bad pixels.

    Raises
    ------
    ConfigError
        Unknown backend, ``"cython"`` without the extension, photon energy not positive.
    ConstantsError
        Constants of another frame shape or detector.
    """

    detector: ClassVar[str] = ""
    data_role: ClassVar[str] = "data"  # key of the data output in output_dtypes

    def __init__(
        self,
        constants: Any,
        backend: str = "numba",
        *,
        frame_shape: Any = _MODULE,
        photon_energy: float | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(
                f"unknown calibration backend {backend!r}; known backends: {', '.join(BACKENDS)}",
                key="calibration.backend",
            )
        if backend == "cython" and not native_available():
            raise ConfigError(
                f"calibration backend 'cython' needs the compiled extension "
                f"({native_unavailable_reason()}); use 'numba' or build it with "
                "`python setup.py build_ext --inplace`",
                key="calibration.backend",
            )
        if frame_shape is _MODULE:
            frame_shape = self.spec.module_shape
        if frame_shape is not None and constants.frame_shape != tuple(frame_shape):
            raise ConstantsError(
                f"constants are for frames of {constants.frame_shape}, "
                f"expected {tuple(frame_shape)}",
                source=constants.provenance.get("path"),
            )
        kind = getattr(constants, "detector", "jungfrau")
        if kind != self.detector:
            raise ConstantsError(
                f"constants are for {kind}, not {self.detector}",
                source=constants.provenance.get("path"),
            )
        if photon_energy is not None and not (
            np.isfinite(photon_energy) and float(photon_energy) > 0
        ):
            raise ConfigError(
                f"photon energy must be positive. Got {photon_energy} instead.",
                key="calibration.photon_energy",
            )
        self.constants = constants
        self.backend = backend
        self.photon_energy = None if photon_energy is None else float(photon_energy)
        self._zero_cells = np.zeros(0, np.intp)
        self._local = threading.local()  # per worker thread: float32 scratch

    @property
    def spec(self) -> DetectorSpec:
        """The detector's registry entry."""
        return get_detector(self.detector)

    def __repr__(self) -> str:
        extra = f", photon_energy={self.photon_energy}" if self.photon_energy else ""
        return (
            f"{type(self).__name__}(backend={self.backend!r}, cells={self.constants.cells}, "
            f"frame_shape={self.frame_shape}{extra})"
        )

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(slow_scan, fast_scan) of the frames this corrector takes."""
        return self.constants.frame_shape

    @property
    def output_dtypes(self) -> dict[str, np.dtype]:
        """dtype of each output: data float32 (int16 photon counts), gain uint8, mask uint32."""
        data = np.int16 if self.photon_energy is not None else np.float32
        return {
            self.data_role: np.dtype(data),
            "gain": np.dtype(np.uint8),
            "mask": np.dtype(np.uint32),
        }

    def empty_outputs(self, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Output buffers for ``frames`` frames, 64-byte aligned (data, gain, mask).

        Aligned buffers let the kernels stream their stores past the cache; any
        C-contiguous buffers work.
        """
        shape = (frames, *self.frame_shape)
        data, gain, mask = (empty_aligned(shape, dt) for dt in self.output_dtypes.values())
        return data, gain, mask

    def warmup(self) -> None:
        """Get the backend ready before the first train (Numba: compile or load the cache;
        Cython: one tiny call, so a broken build fails here)."""
        start = time.perf_counter()
        self._warmup()
        if self.photon_energy is not None and self.backend != "numpy":
            tiny = np.zeros((1, 1, 4), np.float32)
            _PHOTONS[self.backend](
                tiny, np.zeros(tiny.shape, np.uint32), 1.0, np.empty(tiny.shape, np.int16)
            )
        log.debug("%r ready in %.2f s", self, time.perf_counter() - start)

    def _warmup(self) -> None:
        if self.backend == "numba":
            nk.warmup_numba_more()

    # -- the entry points ---------------------------------------------------------------------

    def correct_module(
        self,
        module_data: Mapping[str, Any],
        out_data: np.ndarray,
        out_gain: np.ndarray,
        out_mask: np.ndarray,
        *,
        source: str | None = None,
        train_id: int | None = None,
    ) -> None:
        """Correct one source's data dict as it arrives (keys from the registry entry).

        File-style or online-style keys and axis orders are both accepted; the data key is
        required, the gain and cell keys are used when present.

        Raises
        ------
        DataError
            A required key is missing, or an array of the wrong dtype or shape.
        """
        keys = self.spec.file_layout.keys
        online = self.spec.online_layout.keys
        data_key = keys["data"]
        if data_key not in module_data:
            raise DataError(
                f"no {data_key!r} in this source's data (keys: {sorted(module_data)})",
                source=source, train_id=train_id, key=data_key,
            )  # fmt: skip
        gain_key = online.get("gain") or keys.get("gain")
        cell_key = keys.get("cell")
        gain = module_data.get(gain_key) if gain_key else None
        cells = module_data.get(cell_key) if cell_key else None
        self.correct(
            module_data[data_key], gain, cells, out_data, out_gain, out_mask,
            source=source, train_id=train_id,
        )  # fmt: skip

    def correct(
        self,
        raw: np.ndarray,
        gain: np.ndarray | None,
        memory_cells: np.ndarray | None,
        out_data: np.ndarray,
        out_gain: np.ndarray,
        out_mask: np.ndarray,
        *,
        source: str | None = None,
        train_id: int | None = None,
    ) -> None:
        """Correct one train of one module into caller-owned outputs.

        Parameters
        ----------
        raw
            The detector's raw data (see the subclass).
        gain
            A separate gain/digital array where the stream has one, else ``None``.
        memory_cells
            Memory cell of each frame (frames,) or (frames, 1); ignored with one cell.
        out_data, out_gain, out_mask
            From :meth:`empty_outputs` (or C-contiguous, writable, same dtypes and shape).
        source, train_id
            Named in errors.

        Raises
        ------
        DataError
            Wrong dtype or shape of an input or output, or a memory cell outside the
            constants' cells.
        """
        where = {"source": source, "train_id": train_id}
        frames = self._frames(raw, where)
        shape = (frames, *self.frame_shape)
        dtypes = list(self.output_dtypes.values())
        for key, arr, dtype in zip(("out_data", "out_gain", "out_mask"), (out_data, out_gain,
                                   out_mask), dtypes, strict=True):  # fmt: skip
            self._output(arr, key, dtype, shape, where)
        cell = self.cell_indices(memory_cells, frames, source=source, train_id=train_id)
        if self.photon_energy is None:
            self._correct(raw, gain, cell, out_data, out_gain, out_mask, where)
            return
        energy = self._scratch(shape)
        self._correct(raw, gain, cell, energy, out_gain, out_mask, where)
        _PHOTONS[self.backend](energy, out_mask, self.photon_energy, out_data)

    def _frames(self, raw: Any, where: dict[str, Any]) -> int:
        key = self.spec.file_layout.keys["data"]
        if not isinstance(raw, np.ndarray) or raw.ndim < 1:
            raise DataError(f"expected a numpy array, found {type(raw).__name__}", key=key, **where)
        return int(raw.shape[0])

    def _correct(self, raw, gain, cell, out_data, out_gain, out_mask, where) -> None:
        raise NotImplementedError

    def _scratch(self, shape: tuple[int, ...], name: str = "energy") -> np.ndarray:
        """A float32 buffer of ``shape`` owned by the calling thread, reused across trains."""
        size = int(np.prod(shape))
        buf = getattr(self._local, name, None)
        if buf is None or buf.size < size:
            buf = empty_aligned((size,), np.float32)
            setattr(self._local, name, buf)
        return buf[:size].reshape(shape)

    # -- checks -------------------------------------------------------------------------------

    def cell_indices(
        self,
        memory_cells: np.ndarray | None,
        frames: int,
        *,
        source: str | None = None,
        train_id: int | None = None,
    ) -> np.ndarray:
        """Constants cell index (intp) of each frame, from the stream's memory cells."""
        cells = self.constants.cells
        if cells == 1:
            zeros = self._zero_cells  # one read: another thread may swap it
            if zeros.shape[0] != frames:
                zeros = np.zeros(frames, np.intp)
                zeros.flags.writeable = False
                self._zero_cells = zeros
            return zeros
        key = self.spec.file_layout.keys.get("cell", "cell")
        if memory_cells is None:
            raise DataError(
                f"{key} is required with {cells}-cell constants", source=source,
                train_id=train_id, key=key,
            )  # fmt: skip
        mc = np.asarray(memory_cells)
        if mc.ndim == 2 and mc.shape[1:] == (1,):
            mc = mc[:, 0]
        if mc.shape != (frames,) or mc.dtype.kind not in "iu":
            raise DataError(
                f"expected an integer array of shape ({frames},), found {mc.dtype} {mc.shape}",
                source=source, train_id=train_id, key=key,
            )  # fmt: skip
        if frames and (int(mc.min()) < 0 or int(mc.max()) >= cells):
            bad = sorted({int(v) for v in mc if not 0 <= int(v) < cells})
            raise DataError(
                f"memory cells {bad} outside the constants' {cells} cells",
                source=source, train_id=train_id, key=key,
            )  # fmt: skip
        return mc.astype(np.intp)

    def _input(
        self,
        arr: Any,
        key: str,
        dtype: type,
        shape: tuple[Any, ...],
        where: dict[str, Any],
    ) -> np.ndarray:
        """Check dtype and shape (``"frames"`` in ``shape`` matches any); C-contiguous result."""
        if not isinstance(arr, np.ndarray):
            raise DataError(f"expected a numpy array, found {type(arr).__name__}", key=key, **where)
        if arr.dtype != dtype:
            raise DataError(
                f"expected dtype {np.dtype(dtype)}, found {arr.dtype}", key=key, **where
            )
        if arr.ndim != len(shape) or any(
            not isinstance(want, str) and have != want
            for have, want in zip(arr.shape, shape, strict=True)
        ):
            raise DataError(f"expected shape {shape}, found {arr.shape}", key=key, **where)
        return np.ascontiguousarray(arr)

    @staticmethod
    def _output(
        arr: Any, key: str, dtype: Any, shape: tuple[int, ...], where: dict[str, Any]
    ) -> None:
        dtype = np.dtype(dtype)
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != shape:
            found = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr)
            raise DataError(
                f"output buffer must be {dtype} of shape {shape}, found {found}", key=key, **where
            )
        if not (arr.flags.c_contiguous and arr.flags.writeable):
            raise DataError("output buffer must be C-contiguous and writable", key=key, **where)


class JungfrauCorrector(Corrector):
    """Correct JUNGFRAU module data: offset, gain stage, relative gain, bad pixels.

    ``correct(adc, gain, memory_cells, ...)``: ``data.adc`` uint16 (frames, 512, 1024) with
    the gain in bits 14-15, or ``data.gain`` uint8 (0, 1, 3) beside it; ``data.memoryCell``
    with 16-cell constants. See :class:`Corrector` for the parameters.
    """

    detector = "jungfrau"
    data_role = "adc"

    def __init__(
        self,
        constants: JungfrauConstants,
        backend: str = "numba",
        *,
        frame_shape: tuple[int, int] | None = MODULE_SHAPE,
        photon_energy: float | None = None,
    ) -> None:
        super().__init__(constants, backend, frame_shape=frame_shape, photon_energy=photon_energy)
        self._kernel: Callable[..., None] = {
            "numba": correct_jungfrau_numba,
            "cython": correct_jungfrau_cython,
            "numpy": self._correct_numpy,
        }[backend]

    def _warmup(self) -> None:
        if self.backend == "numba":
            warmup_numba()
            if self.photon_energy is not None:
                nk.warmup_numba_more()
        elif self.backend == "cython":
            shape = (1, 2, 8)
            tables = np.zeros((1, 3, 2, 8), np.float32)
            correct_jungfrau_cython(
                np.zeros(shape, np.uint16), None, np.zeros(1, np.intp), tables, tables,
                np.zeros((1, 3, 2, 8), np.uint32), np.empty(shape, np.float32),
                np.empty(shape, np.uint8), np.empty(shape, np.uint32),
            )  # fmt: skip

    def _frames(self, raw: Any, where: dict[str, Any]) -> int:
        if not isinstance(raw, np.ndarray):
            raise DataError(
                f"expected a numpy array, found {type(raw).__name__}", key="data.adc", **where
            )
        return int(raw.shape[0]) if raw.ndim else 0

    def _correct(self, adc, gain, cell, out_data, out_gain, out_mask, where) -> None:
        adc = self._input(adc, "data.adc", np.uint16, ("frames", *self.frame_shape), where)
        if gain is not None:
            gain = self._input(gain, "data.gain", np.uint8, adc.shape, where)
        c = self.constants
        self._kernel(adc, gain, cell, c.offset, c.inv_gain, c.badpix, out_data, out_gain, out_mask)

    def _correct_numpy(
        self, adc, gain, cell, offset, inv_gain, badpix, out_data, out_gain, out_mask
    ) -> None:
        correct_jungfrau_reference(adc, gain, cell, self.constants, out_data, out_gain, out_mask)


class AgipdCorrector(Corrector):
    """Correct AGIPD module data: gain stage from the digital value, offset, relative gain
    (PC), flat field, bad pixels, optional common mode.

    ``correct(image, gain, cell_ids, ...)``: file style ``image.data`` uint16
    (frames, 2, 512, 128) (analog, digital) with ``gain=None``; online style ``image.data``
    and ``image.gain`` uint16 (frames, 512, 128) each. ``image.cellId`` (frames,) or
    (frames, 1).

    Parameters
    ----------
    common_mode
        Subtract per 64 x 64 ASIC the median of its good high-gain pixels below
        ``cm_threshold`` (in output units) from its good high-gain pixels.
    cm_threshold
        Photon-hit cut for the common-mode median.
    """

    detector = "agipd"

    def __init__(
        self,
        constants: DetectorConstants,
        backend: str = "numba",
        *,
        frame_shape: Any = _MODULE,
        photon_energy: float | None = None,
        common_mode: bool = False,
        cm_threshold: float = 20.0,
    ) -> None:
        super().__init__(constants, backend, frame_shape=frame_shape, photon_energy=photon_energy)
        if constants.thresholds is None:
            raise ConstantsError("AGIPD constants need ThresholdsDark", key="ThresholdsDark")
        self.common_mode = common_mode
        self.cm_threshold = float(cm_threshold)
        self.asic_shape = self.spec.asic_shape

    def _correct(self, image, gain, cell, out_data, out_gain, out_mask, where) -> None:
        fshape = self.frame_shape
        key = "image.data"
        if gain is None and isinstance(image, np.ndarray) and image.ndim == 3:
            raise DataError(
                f"image.data {image.shape} is online style (analog only): image.gain must come "
                f"with it, or image.data must be file style (frames, 2, {fshape[0]}, {fshape[1]})",
                key=key, **where,
            )  # fmt: skip
        if gain is None:
            image = self._input(image, key, np.uint16, ("frames", 2, *fshape), where)
            args = (image, 0, image, 1)
        else:
            image = self._input(image, key, np.uint16, ("frames", *fshape), where)
            gain = self._input(gain, "image.gain", np.uint16, image.shape, where)
            args = (image, 0, gain, 0)
        c = self.constants
        tables = (c.thresholds, c.offset, c.factor, c.badpix)
        if self.backend == "numba":
            nk.correct_agipd_numba(*args, cell, *tables, out_data, out_gain, out_mask)
        elif self.backend == "cython":
            correct_agipd_cython(*args, cell, *tables, out_data, out_gain, out_mask)
        else:
            analog = image[:, 0] if gain is None else image
            digital = image[:, 1] if gain is None else gain
            ref.correct_agipd_reference(analog, digital, cell, c, out_data, out_gain, out_mask)
        if self.common_mode:
            self._common_mode(out_data, out_gain, out_mask)

    def _common_mode(self, data, gain, mask) -> None:
        block, thr = self.asic_shape, self.cm_threshold
        if self.backend == "numpy":
            ref.common_mode_asics_reference(data, gain, mask, block, 0, thr)
            return
        scratch = self._scratch((block[0] * block[1],), "cm")
        kernel = nk.common_mode_asics_numba if self.backend == "numba" else common_mode_asics_cython
        kernel(data, gain, mask, block, 0, thr, scratch)


class LpdCorrector(Corrector):
    """Correct LPD module data: gain stage from bits 12-13 (3: invalid, WRONG_GAIN_VALUE),
    12-bit ADC, offset, relative gain, flat field, bad pixels.

    ``correct(image, None, cell_ids, ...)``: ``image.data`` uint16 (frames, 256, 256) or
    (frames, 1, 256, 256); ``image.cellId`` (frames,) or (frames, 1).
    """

    detector = "lpd"

    def _correct(self, image, gain, cell, out_data, out_gain, out_mask, where) -> None:
        key = "image.data"
        if isinstance(image, np.ndarray) and image.ndim == 4:
            image = self._input(image, key, np.uint16, ("frames", 1, *self.frame_shape), where)
        else:
            image = self._input(image, key, np.uint16, ("frames", *self.frame_shape), where)
        c = self.constants
        tables = (c.offset, c.factor, c.badpix)
        if self.backend == "numba":
            nk.correct_lpd_numba(image, 0, cell, *tables, out_data, out_gain, out_mask)
        elif self.backend == "cython":
            correct_lpd_cython(image, 0, cell, *tables, out_data, out_gain, out_mask)
        else:
            raw = image.reshape(image.shape[0], *self.frame_shape)
            ref.correct_lpd_reference(raw, cell, c, out_data, out_gain, out_mask)


class Epix100Corrector(Corrector):
    """Correct ePix100 module data: offset, common mode, relative gain, bad pixels.

    ``correct(pixels, None, None, ...)``: ``data.image.pixels`` uint16 (frames, 704, 768).

    Parameters
    ----------
    common_mode
        Per ASIC (352 x 384), subtract from each row, then each column, the median of its
        good pixels below ``cm_threshold`` (ADU after offset; photon hits above it are
        skipped).
    cm_threshold
        Photon-hit cut in ADU.
    """

    detector = "epix100"

    def __init__(
        self,
        constants: DetectorConstants,
        backend: str = "numba",
        *,
        frame_shape: Any = _MODULE,
        photon_energy: float | None = None,
        common_mode: bool = True,
        cm_threshold: float = 50.0,
        asic_shape: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(constants, backend, frame_shape=frame_shape, photon_energy=photon_energy)
        self.common_mode = common_mode
        self.cm_threshold = float(cm_threshold)
        self.asic_shape = tuple(asic_shape or self.spec.asic_shape)
        ss, fs = self.frame_shape
        if self.common_mode and (ss % self.asic_shape[0] or fs % self.asic_shape[1]):
            raise ConfigError(
                f"common-mode blocks {self.asic_shape} do not tile frames of {self.frame_shape}"
            )

    def _correct(self, pixels, gain, cell, out_data, out_gain, out_mask, where) -> None:
        key = "data.image.pixels"
        pixels = self._input(pixels, key, np.uint16, ("frames", *self.frame_shape), where)
        c = self.constants
        block = self.asic_shape if self.common_mode else None
        if self.backend == "numpy":
            ref.correct_epix100_reference(
                pixels, c, out_data, out_gain, out_mask, block, self.cm_threshold
            )
            return
        scratch = self._scratch((nk.scratch_size(self.asic_shape),), "cm")
        kernel = nk.correct_epix100_numba if self.backend == "numba" else correct_epix100_cython
        kernel(pixels, c.offset, c.factor, c.badpix, out_data, out_gain, out_mask, block,
               self.cm_threshold, scratch)  # fmt: skip


def make_corrector(
    detector: str, constants: Any, backend: str = "numba", **options: Any
) -> Corrector:
    """The corrector of a registered detector (``options``: the class's keyword arguments).

    Raises
    ------
    ConfigError
        Unknown detector or backend.
    """
    spec = get_detector(detector)
    module = importlib.import_module(__name__)
    cls = getattr(module, spec.corrector)
    return cls(constants, backend, **options)
