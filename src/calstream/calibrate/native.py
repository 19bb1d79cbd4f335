"""Access to the Cython kernels in ``calstream._native``, with a switch and a fallback.

Set ``CALSTREAM_NO_EXTENSIONS=1`` to ignore the extension (the Numba kernels serve instead).
If the extension cannot be imported (not built, wrong platform), :func:`native_available`
returns False and one ``RuntimeWarning`` says why; nothing happens at import time.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

import numpy as np

from calstream.calibrate.kernels import check_kernel_args
from calstream.calibrate.numba_kernels import (
    check_common_mode,
    prepare_agipd,
    prepare_epix100,
    prepare_lpd,
    prepare_photons,
)

__all__ = [
    "NO_EXTENSIONS_ENV",
    "common_mode_asics_cython",
    "common_mode_lines_cython",
    "correct_agipd_cython",
    "correct_epix100_cython",
    "correct_jungfrau_cython",
    "correct_lpd_cython",
    "native_available",
    "native_unavailable_reason",
    "photons_cython",
    "stream_stores",
]

NO_EXTENSIONS_ENV = "CALSTREAM_NO_EXTENSIONS"


def _disabled_by_env() -> bool:
    value = os.environ.get(NO_EXTENSIONS_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no")


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    """(module, None) or (None, reason). Cached: the warning is given once per process."""
    if _disabled_by_env():
        return None, f"disabled by {NO_EXTENSIONS_ENV}"
    try:
        from calstream import _native
    except ImportError as exc:
        reason = f"cannot import calstream._native: {exc}"
        warnings.warn(
            f"{reason}; the Cython kernels are unavailable (the Numba kernels still are). "
            "Build them with `python setup.py build_ext --inplace`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, reason
    return _native, None


def native_available() -> bool:
    """True if the Cython extension is importable and not switched off."""
    return _load()[0] is not None


def native_unavailable_reason() -> str | None:
    """Why the extension is not used, or None when it is."""
    return _load()[1]


def stream_stores() -> bool:
    """True if the extension was compiled with non-temporal stores (AVX2 or AVX-512)."""
    module = _load()[0]
    return bool(module is not None and module.STREAM_STORES)


def correct_jungfrau_cython(
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
    """Cython twin of :func:`~calstream.calibrate.kernels.correct_jungfrau_numba`.

    The G0 fast path writes with non-temporal stores when the outputs are 64-byte aligned
    (see :meth:`~calstream.calibrate.detectors.JungfrauCorrector.empty_outputs`).

    Raises
    ------
    RuntimeError
        The extension is not available (see :func:`native_unavailable_reason`).
    ValueError
        Shapes that do not fit together or a cell index out of range.
    """
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"Cython kernels unavailable: {reason}")
    cell = np.ascontiguousarray(cell, dtype=np.intp)
    check_kernel_args(adc, gain, cell, offset, inv_gain, badpix, out_data, out_gain, out_mask)
    module.correct_jungfrau(adc, gain, cell, offset, inv_gain, badpix, out_data, out_gain, out_mask)


def _module() -> ModuleType:
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"Cython kernels unavailable: {reason}")
    return module


def correct_agipd_cython(*args: np.ndarray | int) -> None:
    """Cython twin of :func:`~calstream.calibrate.numba_kernels.correct_agipd_numba`."""
    module = _module()
    module.correct_agipd(*prepare_agipd(*args))


def correct_lpd_cython(*args: np.ndarray | int) -> None:
    """Cython twin of :func:`~calstream.calibrate.numba_kernels.correct_lpd_numba`."""
    module = _module()
    module.correct_lpd(*prepare_lpd(*args))


def correct_epix100_cython(
    raw: np.ndarray,
    offset: np.ndarray,
    factor: np.ndarray,
    badpix: np.ndarray,
    out_data: np.ndarray,
    out_gain: np.ndarray,
    out_mask: np.ndarray,
    common_mode: tuple[int, int] | None,
    threshold: float,
    scratch: np.ndarray,
) -> None:
    """Cython twin of :func:`~calstream.calibrate.numba_kernels.correct_epix100_numba`."""
    module = _module()
    raw2, off, fac, bad = prepare_epix100(
        raw, offset, factor, badpix, out_data, out_gain, out_mask, common_mode, scratch
    )
    bss, bfs = common_mode if common_mode is not None else (0, 0)
    module.correct_epix100(
        raw2, off, fac, bad, out_data, out_gain.reshape(raw2.shape), out_mask, bss, bfs,
        threshold, scratch,
    )  # fmt: skip


def common_mode_asics_cython(
    data: np.ndarray,
    gain: np.ndarray,
    mask: np.ndarray,
    block: tuple[int, int],
    stage: int,
    threshold: float,
    scratch: np.ndarray,
) -> None:
    """Cython twin of :func:`~calstream.calibrate.numba_kernels.common_mode_asics_numba`."""
    module = _module()
    check_common_mode(data, gain, mask, block, scratch)
    module.common_mode_asics(data, gain, mask, *block, stage, threshold, scratch)


def common_mode_lines_cython(
    data: np.ndarray, mask: np.ndarray, block: tuple[int, int], threshold: float,
    scratch: np.ndarray,
) -> None:  # fmt: skip
    """Cython twin of :func:`~calstream.calibrate.numba_kernels.common_mode_lines_numba`."""
    module = _module()
    check_common_mode(data, None, mask, block, scratch)
    module.common_mode_lines(data, mask, *block, threshold, scratch)


def photons_cython(
    data: np.ndarray, mask: np.ndarray, photon_energy: float, out: np.ndarray
) -> None:
    """Cython twin of :func:`~calstream.calibrate.numba_kernels.photons_numba`."""
    module = _module()
    module.photons(*prepare_photons(data, mask, photon_energy, out))
