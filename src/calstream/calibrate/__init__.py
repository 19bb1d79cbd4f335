"""Calibration: the detector registry, constants in kernel layout, correction backends."""

from calstream.calibrate.constants import (
    BADPIX,
    JungfrauConstants,
    load_jungfrau_constants,
    synth_jungfrau_constants,
)
from calstream.calibrate.detectors import (
    BACKENDS,
    AgipdCorrector,
    Corrector,
    Epix100Corrector,
    JungfrauCorrector,
    LpdCorrector,
    make_corrector,
)
from calstream.calibrate.facility import DetectorConstants, load_constants, synth_constants
from calstream.calibrate.registry import DetectorSpec, detector_names, get_detector

__all__ = [
    "BACKENDS",
    "BADPIX",
    "AgipdCorrector",
    "Corrector",
    "DetectorConstants",
    "DetectorSpec",
    "Epix100Corrector",
    "JungfrauConstants",
    "JungfrauCorrector",
    "LpdCorrector",
    "detector_names",
    "get_detector",
    "load_constants",
    "load_jungfrau_constants",
    "make_corrector",
    "synth_constants",
    "synth_jungfrau_constants",
]
