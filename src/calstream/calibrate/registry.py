"""The detector registry: one declarative entry per detector family.

Each :class:`DetectorSpec` says what the rest of calstream needs to know about a detector:
module shape, how its raw data arrives (keys and axis orders, file-style and online-style),
how the gain stage is encoded, how many memory cells it has, which facility constants it
reads, its correction steps, its output keys and dtypes, and which corrector class and
constants derivation serve it. Adding a detector is one entry here plus its kernels.

>>> get_detector("agipd").module_shape
(512, 128)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calstream.errors import ConfigError

__all__ = [
    "ConstantSpec",
    "DetectorSpec",
    "RawLayout",
    "detector_names",
    "get_detector",
    "register_detector",
]


@dataclass(frozen=True)
class ConstantSpec:
    """One facility constant: HDF5 dataset ``<name>/data``, axes (fast_scan, slow_scan, cell, gain).

    Attributes
    ----------
    name
        Facility (CalCat) name, e.g. ``"Offset"``.
    required
        Whether a file without it is an error (otherwise its neutral value is used).
    gains
        Allowed lengths of the gain axis (e.g. ``(3,)``; ``(1, 3)`` broadcasts one over all).
    per_cell
        False: the cell axis may also be 1 (one value for every cell).
    badpix
        An integer bit set (uint32) rather than a float constant.
    select
        Entries of the gain axis to read, where that axis holds fit parameters (e.g. SlopesPC's
        10): only these are read from the file; ``None`` reads all.
    use
        What the kernels take from it (documentation, shown by ``calstream constants``).
    """

    name: str
    required: bool
    gains: tuple[int, ...]
    per_cell: bool = True
    badpix: bool = False
    select: tuple[int, ...] | None = None
    use: str = ""


@dataclass(frozen=True)
class RawLayout:
    """Where one stream style keeps a module's raw data.

    ``keys`` maps a role (``"data"``, ``"gain"``, ``"cell"``) to the key in the source's
    data; ``axes`` gives each key's axis order (``"frames,2,ss,fs"``: analog and digital
    interleaved per frame).
    """

    keys: Mapping[str, str]
    axes: Mapping[str, str]


@dataclass(frozen=True)
class DetectorSpec:
    """Everything calstream knows about one detector family (see the module docstring)."""

    name: str
    module_shape: tuple[int, int]  # (slow_scan, fast_scan)
    max_cells: int
    gains: int  # gain stages the constants carry
    gain_encoding: str
    adc_bits: int
    asic_shape: tuple[int, int]  # (slow_scan, fast_scan) of one ASIC: the common-mode block
    file_layout: RawLayout
    online_layout: RawLayout
    constants: tuple[ConstantSpec, ...]
    steps: tuple[str, ...]
    output_keys: Mapping[str, str]  # role (data, gain, mask) -> dataset key
    module_name: str  # e.g. "AGIPD{module:02d}", used in file and source names
    corrector: str  # class name in calstream.calibrate.detectors
    derive: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    # How a pipeline names things (defaults of the config; placeholders {detector_id}, {module}):
    raw_source: str = "{detector_id}/DET/{module}CH0:xtdf"  # input source of a module
    corr_source: str = "{detector_id}/CORR/{module}CH0:output"  # corrected source in the files
    detector_id: str = ""  # a typical detector name, the config's default
    default_cells: int = 1  # calibration.cells when the config does not say
    first_module: int = 0  # module numbers start here (XTDF channels from 0, JUNGFRAU from 1)
    exdf_layout: str = "xtdf"  # corrected-file layout (calstream.store.exdf.layout_for)
    common_mode: bool = False  # whether the corrector has an optional common-mode step
    cm_threshold: float = 0.0  # its default photon-hit cut (output units)

    def check_cells(self, cells: int, key: str = "calibration.cells") -> None:
        """ConfigError(key) unless the detector runs with ``cells`` memory cells (JUNGFRAU:
        1 or 16; the others 1 up to their maximum)."""
        if self.name == "jungfrau":
            allowed, say = (1, 16), "1 or 16"
        else:
            allowed, say = range(1, self.max_cells + 1), f"1 to {self.max_cells}"
        if cells not in allowed:
            raise ConfigError(f"{self.name} has {say} memory cells. Got {cells}.", key=key)

    @property
    def aggregator(self) -> str:
        """File-name part before the module number (``AGIPD`` from ``AGIPD{module:02d}``)."""
        return self.module_name.split("{", 1)[0]

    @property
    def output_dtypes(self) -> dict[str, np.dtype]:
        """dtype per output role; ``data`` becomes int16 with photon output."""
        return {
            "data": np.dtype(np.float32),
            "gain": np.dtype(np.uint8),
            "mask": np.dtype(np.uint32),
        }

    def constant(self, name: str) -> ConstantSpec:
        """The spec of one constant, by facility name."""
        for spec in self.constants:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def layout(self, style: str) -> RawLayout:
        """``"file"`` or ``"online"``."""
        if style == "file":
            return self.file_layout
        if style == "online":
            return self.online_layout
        raise ConfigError(f"unknown stream style {style!r}; known styles: file, online")


_REGISTRY: dict[str, DetectorSpec] = {}


def register_detector(spec: DetectorSpec) -> DetectorSpec:
    """Add a detector family (its name must be new)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"detector {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def detector_names() -> tuple[str, ...]:
    """Names of the registered detector families."""
    return tuple(_REGISTRY)


def get_detector(name: str) -> DetectorSpec:
    """The spec of a detector family; an unknown name lists the known ones.

    Raises
    ------
    ConfigError
        ``name`` is not registered.
    """
    try:
        return _REGISTRY[name.lower()]
    except (KeyError, AttributeError):
        known = ", ".join(_REGISTRY)
        raise ConfigError(
            f"unknown detector {name!r}; known detectors: {known}", key="source.detector"
        ) from None


# -- the four families ----------------------------------------------------------------------

from calstream.calibrate import facility as _facility  # noqa: E402  (needs the classes above)

_BAD3 = (3,)

register_detector(
    DetectorSpec(
        name="jungfrau",
        module_shape=(512, 1024),
        max_cells=16,
        gains=3,
        gain_encoding="bits 14-15 of data.adc (00 G0, 01 G1, 11 G2, 10 invalid) or data.gain "
        "(0, 1, 3); 14-bit ADC",
        adc_bits=14,
        asic_shape=(256, 256),
        file_layout=RawLayout(
            keys={"data": "data.adc", "gain": "data.gain", "cell": "data.memoryCell"},
            axes={"data.adc": "frames,ss,fs", "data.gain": "frames,ss,fs"},
        ),
        online_layout=RawLayout(
            keys={"data": "data.adc", "gain": "data.gain", "cell": "data.memoryCell"},
            axes={"data.adc": "frames,ss,fs", "data.gain": "frames,ss,fs"},
        ),
        constants=(
            ConstantSpec("Offset10Hz", True, _BAD3, use="offset per (cell, gain)"),
            ConstantSpec("RelativeGain10Hz", True, _BAD3, use="divisor per (cell, gain)"),
            ConstantSpec("BadPixelsDark10Hz", True, _BAD3, badpix=True),
            ConstantSpec("BadPixelsFF10Hz", False, _BAD3, badpix=True),
        ),
        steps=("gain stage", "offset", "relative gain", "bad pixels"),
        output_keys={"data": "data.adc", "gain": "data.gain", "mask": "data.mask"},
        module_name="JNGFR{module:02d}",
        corrector="JungfrauCorrector",
        derive=_facility.derive_jungfrau,
        raw_source="{detector_id}/DET/JNGFR{module:02d}:daqOutput",
        corr_source="{detector_id}/CORR/JNGFR{module:02d}:output",
        detector_id="SPB_IRDA_JF4M",
        default_cells=16,
        first_module=1,
        exdf_layout="jungfrau",
    )
)

register_detector(
    DetectorSpec(
        name="agipd",
        module_shape=(512, 128),
        max_cells=352,
        gains=3,
        gain_encoding="digital value per pixel against ThresholdsDark T0, T1 per (cell, pixel): "
        "G1 if digital > T0, G2 if digital > T1",
        adc_bits=14,
        asic_shape=(64, 64),
        file_layout=RawLayout(
            keys={"data": "image.data", "cell": "image.cellId"},
            axes={"image.data": "frames,2,ss,fs"},  # [:, 0] analog, [:, 1] digital
        ),
        online_layout=RawLayout(
            keys={"data": "image.data", "gain": "image.gain", "cell": "image.cellId"},
            axes={"image.data": "frames,ss,fs", "image.gain": "frames,ss,fs"},
        ),
        constants=(
            ConstantSpec("Offset", True, _BAD3, use="offset per (cell, gain)"),
            ConstantSpec(
                "ThresholdsDark", True, (2, 3, 5), select=(0, 1), use="[..., 0] T0, [..., 1] T1"
            ),
            ConstantSpec(
                "SlopesPC", False, (10,), select=(0, 3),
                use="[..., 0] high-gain slope mH, [..., 3] medium-gain slope mM: "
                "rel G0 = median(mH)/mH, G1 = median(mH)/mM, G2 = G1 x 4.48",
            ),
            ConstantSpec(
                "SlopesFF", False, (1, 2, 3), per_cell=False, select=(0,),
                use="[..., 0] flat-field slope s: FF = median(s)/s, all gains",
            ),
            ConstantSpec("BadPixelsDark", True, _BAD3, badpix=True),
            ConstantSpec("BadPixelsPC", False, _BAD3, badpix=True),
            ConstantSpec("BadPixelsFF", False, (1, 3), per_cell=False, badpix=True),
        ),
        steps=("gain stage", "offset", "relative gain (PC)", "flat field", "bad pixels",
               "common mode (optional)"),
        output_keys={"data": "image.data", "gain": "image.gain", "mask": "image.mask"},
        module_name="AGIPD{module:02d}",
        corrector="AgipdCorrector",
        derive=_facility.derive_agipd,
        detector_id="SPB_DET_AGIPD1M-1",
        default_cells=64,
        common_mode=True,
        cm_threshold=20.0,
    )
)

register_detector(
    DetectorSpec(
        name="lpd",
        module_shape=(256, 256),
        max_cells=512,
        gains=3,
        gain_encoding="bits 12-13 of image.data (0 high, 1 medium, 2 low, 3 invalid); 12-bit ADC",
        adc_bits=12,
        asic_shape=(32, 128),
        file_layout=RawLayout(
            keys={"data": "image.data", "cell": "image.cellId"},
            axes={"image.data": "frames,1,ss,fs"},
        ),
        online_layout=RawLayout(
            keys={"data": "image.data", "cell": "image.cellId"},
            axes={"image.data": "frames,ss,fs"},
        ),
        constants=(
            ConstantSpec("Offset", True, _BAD3, use="offset per (cell, gain)"),
            ConstantSpec("RelativeGain", False, _BAD3, use="factor per (cell, gain)"),
            ConstantSpec("FFMap", False, (1, 3), per_cell=False, use="factor per (cell, gain)"),
            ConstantSpec("BadPixelsDark", True, _BAD3, badpix=True),
            ConstantSpec("BadPixelsFF", False, (1, 3), per_cell=False, badpix=True),
        ),
        steps=("gain stage", "offset", "relative gain", "flat field", "bad pixels"),
        output_keys={"data": "image.data", "gain": "image.gain", "mask": "image.mask"},
        module_name="LPD{module:02d}",
        corrector="LpdCorrector",
        derive=_facility.derive_lpd,
        detector_id="FXE_DET_LPD1M-1",
        default_cells=64,
    )
)

register_detector(
    DetectorSpec(
        name="epix100",
        module_shape=(704, 768),
        max_cells=1,
        gains=1,
        gain_encoding="single gain",
        adc_bits=16,
        asic_shape=(352, 384),
        file_layout=RawLayout(
            keys={"data": "data.image.pixels"},
            axes={"data.image.pixels": "frames,ss,fs"},
        ),
        online_layout=RawLayout(
            keys={"data": "data.image.pixels"},
            axes={"data.image.pixels": "frames,ss,fs"},
        ),
        constants=(
            ConstantSpec("OffsetEPix100", True, (1,), use="offset"),
            ConstantSpec("RelativeGainEPix100", False, (1,), use="divisor"),
            ConstantSpec("BadPixelsDarkEPix100", True, (1,), badpix=True),
        ),
        steps=("offset", "common mode (rows, then columns, per ASIC; optional)",
               "relative gain", "bad pixels"),
        output_keys={"data": "data.image.pixels", "gain": "data.image.gain",
                     "mask": "data.image.mask"},
        module_name="EPIX{module:02d}",
        corrector="Epix100Corrector",
        derive=_facility.derive_epix100,
        raw_source="{detector_id}/DET/RECEIVER:daqOutput",
        corr_source="{detector_id}/CORR/RECEIVER:daqOutput",
        detector_id="MID_EXP_EPIX-1",
        default_cells=1,
        first_module=1,
        exdf_layout="epix100",
        common_mode=True,
        cm_threshold=50.0,
    )
)
