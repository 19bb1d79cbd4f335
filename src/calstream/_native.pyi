"""Type stubs for the Cython extension built from ext/_native.pyx."""

import numpy as np
from numpy.typing import NDArray

STREAM_STORES: bool

def correct_jungfrau(
    adc: NDArray[np.uint16],
    gain: NDArray[np.uint8] | None,
    cell: NDArray[np.intp],
    offset: NDArray[np.float32],
    inv_gain: NDArray[np.float32],
    badpix: NDArray[np.uint32],
    out_data: NDArray[np.float32],
    out_gain: NDArray[np.uint8],
    out_mask: NDArray[np.uint32],
) -> None: ...

# AGIPD, LPD, ePix100, common mode, photons: raw (n, planes, npix), tables (cells, gains, npix),
# outputs (n, npix); called through calstream.calibrate.native, which checks the shapes.
def correct_agipd(
    analog: NDArray[np.uint16],
    ai: int,
    digital: NDArray[np.uint16],
    di: int,
    cell: NDArray[np.intp],
    thresholds: NDArray[np.float32],
    offset: NDArray[np.float32],
    factor: NDArray[np.float32],
    badpix: NDArray[np.uint32],
    out_data: NDArray[np.float32],
    out_gain: NDArray[np.uint8],
    out_mask: NDArray[np.uint32],
) -> None: ...
def correct_lpd(
    raw: NDArray[np.uint16],
    ri: int,
    cell: NDArray[np.intp],
    offset: NDArray[np.float32],
    factor: NDArray[np.float32],
    badpix: NDArray[np.uint32],
    out_data: NDArray[np.float32],
    out_gain: NDArray[np.uint8],
    out_mask: NDArray[np.uint32],
) -> None: ...
def correct_epix100(
    raw: NDArray[np.uint16],
    offset: NDArray[np.float32],
    factor: NDArray[np.float32],
    badpix: NDArray[np.uint32],
    out_data: NDArray[np.float32],
    out_gain: NDArray[np.uint8],
    out_mask: NDArray[np.uint32],
    bss: int,
    bfs: int,
    threshold: float,
    scratch: NDArray[np.float32],
) -> None: ...
def common_mode_asics(
    data: NDArray[np.float32],
    gain: NDArray[np.uint8],
    mask: NDArray[np.uint32],
    bss: int,
    bfs: int,
    stage: int,
    threshold: float,
    scratch: NDArray[np.float32],
) -> None: ...
def common_mode_lines(
    data: NDArray[np.float32],
    mask: NDArray[np.uint32],
    bss: int,
    bfs: int,
    threshold: float,
    scratch: NDArray[np.float32],
) -> None: ...
def photons(
    data: NDArray[np.float32],
    mask: NDArray[np.uint32],
    inv_energy: float,
    out: NDArray[np.int16],
) -> None: ...
