"""Calibration: constants in kernel layout and the JUNGFRAU correction backends."""

from calstream.calibrate.constants import (
    BADPIX,
    JungfrauConstants,
    load_jungfrau_constants,
    synth_jungfrau_constants,
)
from calstream.calibrate.detectors import BACKENDS, JungfrauCorrector

__all__ = [
    "BACKENDS",
    "BADPIX",
    "JungfrauConstants",
    "JungfrauCorrector",
    "load_jungfrau_constants",
    "synth_jungfrau_constants",
]
