"""calstream: streaming calibration of European XFEL detector data.

ZeroMQ (Karabo Bridge) in → calibrate (Numba / Cython kernels) → compressed EuXFEL HDF5 into
dCache → storage events. See the README for the command line and the config reference.
"""

from importlib.metadata import PackageNotFoundError, version

from .errors import (
    CalstreamError,
    ChecksumMismatch,
    ConfigError,
    ConstantsError,
    DataError,
    EventError,
    ProtocolError,
    StoreError,
    UnsupportedProtocolError,
)

try:
    __version__ = version("calstream")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CalstreamError",
    "ChecksumMismatch",
    "ConfigError",
    "ConstantsError",
    "DataError",
    "EventError",
    "ProtocolError",
    "StoreError",
    "UnsupportedProtocolError",
    "__version__",
]
