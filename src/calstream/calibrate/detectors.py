"""Per-detector correction front ends: validate a train's arrays, pick the constants cell of
each frame, call the chosen kernel backend."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from calstream.calibrate.constants import MODULE_SHAPE, JungfrauConstants
from calstream.calibrate.kernels import correct_jungfrau_numba, warmup_numba
from calstream.calibrate.native import (
    correct_jungfrau_cython,
    native_available,
    native_unavailable_reason,
)
from calstream.calibrate.reference import correct_jungfrau_reference
from calstream.errors import ConfigError, ConstantsError, DataError

__all__ = ["BACKENDS", "JungfrauCorrector", "empty_aligned"]

log = logging.getLogger(__name__)

#: Kernel implementations, fastest first in the usual case; all give the same results.
BACKENDS = ("numba", "cython", "numpy")

_ALIGN = 64


def empty_aligned(shape: tuple[int, ...], dtype: Any, align: int = _ALIGN) -> np.ndarray:
    """``np.empty`` whose data starts on an ``align``-byte boundary (cache line / AVX-512)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + align, np.uint8)
    start = -buf.ctypes.data % align
    return buf[start : start + nbytes].view(dtype).reshape(shape)


class JungfrauCorrector:
    """Correct JUNGFRAU module data: offset, gain stage, relative gain, bad pixels.

    Parameters
    ----------
    constants
        Constants in kernel layout, e.g. from :func:`load_jungfrau_constants`.
    backend
        One of :data:`BACKENDS`: ``"numba"`` (default), ``"cython"`` (needs the built
        extension), ``"numpy"`` (the reference, ~20x slower).
    frame_shape
        Required (slow_scan, fast_scan) of the constants; a JUNGFRAU module by default,
        ``None`` accepts any (tests with small synthetic constants).

    Raises
    ------
    ConfigError
        Unknown backend, or ``"cython"`` without the extension.
    ConstantsError
        Constants of another frame shape.
    """

    output_dtypes: ClassVar[dict[str, np.dtype]] = {
        "adc": np.dtype(np.float32),
        "gain": np.dtype(np.uint8),
        "mask": np.dtype(np.uint32),
    }

    def __init__(
        self,
        constants: JungfrauConstants,
        backend: str = "numba",
        *,
        frame_shape: tuple[int, int] | None = MODULE_SHAPE,
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
        if frame_shape is not None and constants.frame_shape != tuple(frame_shape):
            raise ConstantsError(
                f"constants are for frames of {constants.frame_shape}, "
                f"expected {tuple(frame_shape)}",
                source=constants.provenance.get("path"),
            )
        self.constants = constants
        self.backend = backend
        self._kernel: Callable[..., None] = {
            "numba": correct_jungfrau_numba,
            "cython": correct_jungfrau_cython,
            "numpy": self._correct_numpy,
        }[backend]
        self._zero_cells = np.zeros(0, np.intp)

    def __repr__(self) -> str:
        return (
            f"JungfrauCorrector(backend={self.backend!r}, cells={self.constants.cells}, "
            f"frame_shape={self.frame_shape})"
        )

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(slow_scan, fast_scan) of the frames this corrector takes."""
        return self.constants.frame_shape

    def warmup(self) -> None:
        """Get the backend ready before the first train.

        Numba: compiles both gain modes (or loads them from Numba's cache: ~0.1 s). Cython:
        one tiny call, so a broken build fails here rather than on the first train.
        """
        start = time.perf_counter()
        if self.backend == "numba":
            warmup_numba()
        elif self.backend == "cython":
            shape = (1, 2, 8)
            tables = np.zeros((1, 3, 2, 8), np.float32)
            correct_jungfrau_cython(
                np.zeros(shape, np.uint16), None, np.zeros(1, np.intp), tables, tables,
                np.zeros((1, 3, 2, 8), np.uint32), np.empty(shape, np.float32),
                np.empty(shape, np.uint8), np.empty(shape, np.uint32),
            )  # fmt: skip
        log.debug("%r ready in %.2f s", self, time.perf_counter() - start)

    def empty_outputs(self, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Output buffers for ``frames`` frames, 64-byte aligned (data, gain, mask).

        Aligned buffers let the Numba and Cython kernels stream their stores past the cache
        (up to 1.5x faster with 16-cell constants); any C-contiguous buffers work.
        """
        shape = (frames, *self.frame_shape)
        data, gain, mask = (empty_aligned(shape, dt) for dt in self.output_dtypes.values())
        return data, gain, mask

    def correct(
        self,
        adc: np.ndarray,
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
        adc
            ``data.adc``: uint16 (frames, 512, 1024).
        gain
            ``data.gain``: uint8 of the same shape, or ``None`` (gain in bits 14-15 of adc).
        memory_cells
            ``data.memoryCell``: integer (frames,); ignored with one constants cell.
        out_data, out_gain, out_mask
            float32 / uint8 / uint32 (frames, 512, 1024), C-contiguous, writable.
        source, train_id
            Named in errors.

        Raises
        ------
        DataError
            Wrong dtype or shape of an input or output, or a memory cell outside the
            constants' cells.
        """
        where = {"source": source, "train_id": train_id}
        adc = self._input(adc, "data.adc", np.uint16, None, where)
        frames = adc.shape[0]
        if gain is not None:
            gain = self._input(gain, "data.gain", np.uint8, adc.shape, where)
        for key, arr, dtype in (
            ("out_data", out_data, np.float32),
            ("out_gain", out_gain, np.uint8),
            ("out_mask", out_mask, np.uint32),
        ):
            self._output(arr, key, dtype, adc.shape, where)
        cell = self.cell_indices(memory_cells, frames, source=source, train_id=train_id)
        c = self.constants
        self._kernel(adc, gain, cell, c.offset, c.inv_gain, c.badpix, out_data, out_gain, out_mask)

    def cell_indices(
        self,
        memory_cells: np.ndarray | None,
        frames: int,
        *,
        source: str | None = None,
        train_id: int | None = None,
    ) -> np.ndarray:
        """Constants cell index (intp) of each frame, from ``data.memoryCell``."""
        cells = self.constants.cells
        if cells == 1:
            zeros = self._zero_cells  # one read: another thread may swap it
            if zeros.shape[0] != frames:
                zeros = np.zeros(frames, np.intp)
                zeros.flags.writeable = False
                self._zero_cells = zeros
            return zeros
        key = "data.memoryCell"
        if memory_cells is None:
            raise DataError(
                f"{key} is required with {cells}-cell constants", source=source,
                train_id=train_id, key=key,
            )  # fmt: skip
        mc = np.asarray(memory_cells)
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
        shape: tuple[int, ...] | None,
        where: dict[str, Any],
    ) -> np.ndarray:
        if not isinstance(arr, np.ndarray):
            raise DataError(f"expected a numpy array, found {type(arr).__name__}", key=key, **where)
        if arr.dtype != dtype:
            raise DataError(
                f"expected dtype {np.dtype(dtype)}, found {arr.dtype}", key=key, **where
            )
        expected = shape if shape is not None else ("frames", *self.frame_shape)
        if (
            arr.ndim != 3
            or arr.shape[1:] != tuple(expected[1:])
            or (shape is not None and arr.shape != shape)
        ):
            raise DataError(f"expected shape {expected}, found {arr.shape}", key=key, **where)
        return np.ascontiguousarray(arr)

    @staticmethod
    def _output(
        arr: Any, key: str, dtype: type, shape: tuple[int, ...], where: dict[str, Any]
    ) -> None:
        dtype = np.dtype(dtype)
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != shape:
            found = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr)
            raise DataError(
                f"output buffer must be {dtype} of shape {shape}, found {found}", key=key, **where
            )
        if not (arr.flags.c_contiguous and arr.flags.writeable):
            raise DataError("output buffer must be C-contiguous and writable", key=key, **where)

    def _correct_numpy(
        self,
        adc: np.ndarray,
        gain: np.ndarray | None,
        cell: np.ndarray,
        offset: np.ndarray,
        inv_gain: np.ndarray,
        badpix: np.ndarray,
        out_data: np.ndarray,
        out_gain: np.ndarray,
        out_mask: np.ndarray,
    ) -> None:
        correct_jungfrau_reference(adc, gain, cell, self.constants, out_data, out_gain, out_mask)
