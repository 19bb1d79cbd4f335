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
