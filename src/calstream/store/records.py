"""Plain records that travel from the writer to the destination and on to the events stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FileInfo", "StoredFile"]


@dataclass(frozen=True)
class FileInfo:
    """What the writer knows about a closed EuXFEL file in the spool.

    ``relpath`` is where the file goes below the destination root (e.g.
    ``r0001/CORR-R0001-JNGFR01-S00000.h5``); ``sources`` the INSTRUMENT source names in it.
    """

    path: Path
    relpath: str
    size: int
    run: int
    proposal: int
    sequence: int
    detector: str
    module: int
    sources: tuple[str, ...]
    first_train: int
    last_train: int
    trains: int
    frames: int
    compression: dict[str, str]
    constants: dict[str, Any] = field(default_factory=dict)
    raw_bytes: int = 0


@dataclass(frozen=True)
class StoredFile:
    """A file that is complete at its destination with a verified checksum."""

    url: str
    path: str
    size: int
    adler32: str
    transfer_time_s: float
    protocol: str
    host: str = ""
    port: int = 0
