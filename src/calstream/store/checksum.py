"""Adler-32, dCache's default checksum, computed in blocks while data passes by."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from calstream.errors import StoreError

__all__ = ["BLOCKSIZE", "Adler32", "adler32_file"]

#: Anything with the buffer protocol (bytes, bytearray, memoryview, contiguous NumPy arrays).
Buffer = bytes | bytearray | memoryview

#: Read/copy block size: large enough that the per-block Python overhead vanishes.
BLOCKSIZE = 8 * 1024 * 1024


class Adler32:
    """A running Adler-32 checksum, formatted the way dCache reports it ('%08x').

    Examples
    --------
    >>> c = Adler32()
    >>> c.update(b"hello ")
    >>> c.update(b"world")
    >>> c.hexdigest()
    '1a0b045d'
    """

    __slots__ = ("_value", "nbytes")

    def __init__(self, data: Buffer = b"") -> None:
        self._value = 1
        self.nbytes = 0
        if data:
            self.update(data)

    def update(self, buffer: Buffer) -> None:
        """Add ``buffer`` (bytes, bytearray, memoryview, contiguous array) to the checksum."""
        self._value = zlib.adler32(buffer, self._value)
        self.nbytes += memoryview(buffer).nbytes

    @property
    def value(self) -> int:
        """The checksum as an unsigned 32-bit integer."""
        return self._value

    def hexdigest(self) -> str:
        """The checksum as 8 lower-case hex digits, e.g. ``'1a0b045d'``."""
        return f"{self._value:08x}"


def adler32_file(path: str | os.PathLike[str], blocksize: int = BLOCKSIZE) -> str:
    """Adler-32 of a whole file, read in ``blocksize`` blocks, as '%08x'.

    Raises
    ------
    StoreError
        The file cannot be read (the message names the path).
    """
    checksum = Adler32()
    buf = bytearray(blocksize)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                checksum.update(view[:n])
    except OSError as exc:
        raise StoreError(f"cannot checksum {Path(path)}: {exc.strerror or exc}") from exc
    return checksum.hexdigest()
