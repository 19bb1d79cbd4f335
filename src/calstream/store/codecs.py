"""Chunk codecs: compress one HDF5 chunk outside HDF5, in the byte format its filter writes.

The writer stores the result with ``dset.id.write_direct_chunk``, so HDF5's single-threaded
filter pipeline never runs while writing, and any reader with the filter (h5py + hdf5plugin,
EXtra-data) decompresses the chunks as if HDF5 had compressed them.

Codecs are frozen dataclasses registered by name (``CODECS``), built from configuration with
:func:`get_codec`. ``encode`` is thread-safe and releases the GIL while it compresses, so a
pool of worker threads compresses in parallel.

Bitshuffle's OpenMP threads
---------------------------
The ``bitshuffle`` wheel runs an OpenMP ``parallel for`` over blocks inside each call, with as
many threads as cores by default. Called from several worker threads that oversubscribes the
cores. OpenMP's thread count (``nthreads-var``) is a per-thread setting, so calstream calls
``omp_set_num_threads(1)`` of the OpenMP runtime bitshuffle is linked against, once in each
thread that encodes, just before its first compression. Nothing changes at import and no other
thread or library is affected (no ``OMP_NUM_THREADS`` in the environment). If that runtime
cannot be found (bitshuffle built without OpenMP, or an unusual install), calstream logs it
once at debug level; set ``OMP_NUM_THREADS=1`` before starting Python to get the same effect.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
import re
import struct
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from calstream.errors import ConfigError

__all__ = [
    "CODECS",
    "LZ4",
    "BitshuffleLZ4",
    "Blosc",
    "Codec",
    "NoCompression",
    "Zstd",
    "get_codec",
    "parse_codec",
    "register_codec",
]

log = logging.getLogger(__name__)
_omp_lock = threading.Lock()

#: HDF5 filter id of bitshuffle (registered with the HDF Group), as in hdf5plugin.
BSHUF_H5FILTER = 32008
_BSHUF_LZ4 = 2  # the filter's "compression" option for LZ4
_BSHUF_TARGET_BLOCK_BYTES = 8192  # bitshuffle's BSHUF_TARGET_BLOCK_SIZE_B
_BSHUF_BLOCKED_MULT = 8
_BSHUF_MIN_BLOCK = 128


@dataclass(frozen=True)
class Codec:
    """Base of all chunk codecs.

    Subclasses set ``name`` and implement :meth:`encode` and :meth:`dataset_kwargs`.
    """

    name: ClassVar[str] = ""

    def encode(self, chunk: np.ndarray) -> bytes:
        """Compress one chunk (a C-contiguous array of the chunk's shape) into filter bytes."""
        raise NotImplementedError

    def encode_frames(self, frames: np.ndarray) -> list[bytes]:
        """Encode each entry along the first axis, e.g. the cells of a train: one chunk each."""
        return [self.encode(frame) for frame in frames]

    def max_encoded_size(self, nbytes: int, itemsize: int) -> int:
        """Upper bound of the encoded size of a chunk of ``nbytes`` in items of ``itemsize``."""
        raise NotImplementedError

    def encode_into(self, chunk: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Encode ``chunk`` into the caller's buffer; returns the used part (a view of ``out``).

        ``out`` is a writable, contiguous 1-D uint8 array of at least
        :meth:`max_encoded_size` bytes. Reusing such buffers (a pool) avoids allocating and
        first-touching fresh memory for every chunk, which costs about a third of the
        throughput on the VMs we measured.
        """
        data = self.encode(chunk)
        view = _check_out(out, len(data))
        view[: len(data)] = np.frombuffer(data, np.uint8)
        return view[: len(data)]

    def dataset_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``h5py.Group.create_dataset`` that declare the filter."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The codec as configuration: ``{"name": ..., **options}``."""
        return {"name": self.name, **asdict(self)}

    @property
    def spec(self) -> str:
        """The codec as configuration text, e.g. ``'zstd:3'`` (:func:`parse_codec` reads it)."""
        values = [getattr(self, f.name) for f in dataclasses.fields(self)]
        defaults = [f.default for f in dataclasses.fields(self)]
        while values and values[-1] == defaults[len(values) - 1]:
            values.pop()
        return ":".join([self.name, *map(str, values)])


#: Codec classes by name; extend with :func:`register_codec`.
CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator adding a codec to :data:`CODECS` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    CODECS[cls.name] = cls
    return cls


def get_codec(name: str, **options: Any) -> Codec:
    """Build the codec registered as ``name`` with its ``options``.

    Raises
    ------
    ConfigError
        Unknown name (the message lists the known ones) or an invalid option.
    """
    try:
        cls = CODECS[name]
    except KeyError:
        known = ", ".join(repr(n) for n in sorted(CODECS))
        raise ConfigError(f"unknown codec {name!r}; known codecs: {known}", key="codec") from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"invalid options for codec {name!r}: {exc}", key="codec") from None


def parse_codec(spec: str) -> Codec:
    """Build a codec from its configuration text: ``name[:option[:option]]``.

    ``"bitshuffle-lz4"``, ``"none"``, ``"lz4"``, ``"zstd"`` or ``"zstd:3"`` (level),
    ``"blosc"``, ``"blosc:lz4"`` or ``"blosc:zstd:5"`` (compressor and level).

    Raises
    ------
    ConfigError
        Unknown name or invalid options (the message says which and lists the known ones).
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"a codec is a name like 'zstd:3'. Got {spec!r} instead.", key="codec")
    name, *args = spec.strip().split(":")
    cls = CODECS.get(name)
    if cls is None:
        return get_codec(name)  # raises, listing the known names
    fields = [f for f in dataclasses.fields(cls) if f.init]
    if len(args) > len(fields):
        raise ConfigError(
            f"codec {name!r} takes at most {len(fields)} option(s) "
            f"({', '.join(f.name for f in fields) or 'none'}). Got {spec!r} instead.",
            key="codec",
        )
    options: dict[str, Any] = {}
    for f, text in zip(fields, args, strict=False):
        try:
            options[f.name] = int(text) if f.type in (int, "int") else text
        except ValueError:
            raise ConfigError(
                f"codec {name!r}: {f.name} must be an integer. Got {text!r} instead.",
                key="codec",
            ) from None
    return get_codec(name, **options)


@register_codec
@dataclass(frozen=True)
class NoCompression(Codec):
    """Chunks stored as they are (no HDF5 filter)."""

    name: ClassVar[str] = "none"

    def encode(self, chunk: np.ndarray) -> bytes:
        return np.ascontiguousarray(chunk).tobytes()

    def max_encoded_size(self, nbytes: int, itemsize: int) -> int:
        return nbytes

    def encode_into(self, chunk: np.ndarray, out: np.ndarray) -> np.ndarray:
        arr = np.ascontiguousarray(chunk)
        view = _check_out(out, arr.nbytes)
        view[: arr.nbytes] = arr.reshape(-1).view(np.uint8)
        return view[: arr.nbytes]

    def dataset_kwargs(self) -> dict[str, Any]:
        return {}


@register_codec
@dataclass(frozen=True)
class BitshuffleLZ4(Codec):
    """Bitshuffle + LZ4, HDF5 filter 32008, as ``hdf5plugin.Bitshuffle(nelems, cname='lz4')``.

    Chunk bytes: uncompressed size (8 bytes, big-endian), block size in bytes (4 bytes,
    big-endian), then ``bitshuffle.compress_lz4`` output (each block with its 4-byte
    big-endian compressed size). ``nelems`` is the block size in elements (0: bitshuffle's
    default, about 8 KiB per block).
    """

    name: ClassVar[str] = "bitshuffle-lz4"
    nelems: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.nelems, int) or self.nelems < 0 or self.nelems % 8:
            raise ConfigError(
                f"nelems must be a non-negative multiple of 8. Got {self.nelems!r} instead.",
                key="codec.nelems",
            )

    def block_elements(self, itemsize: int) -> int:
        """Block size in elements for items of ``itemsize`` bytes (what the filter uses)."""
        if self.nelems:
            return self.nelems
        block = _BSHUF_TARGET_BLOCK_BYTES // itemsize
        block = (block // _BSHUF_BLOCKED_MULT) * _BSHUF_BLOCKED_MULT
        return max(block, _BSHUF_MIN_BLOCK)

    def encode(self, chunk: np.ndarray) -> bytes:
        import bitshuffle

        _single_threaded_openmp()
        arr = np.ascontiguousarray(chunk)
        block = self.block_elements(arr.itemsize)
        header = struct.pack(">QI", arr.nbytes, block * arr.itemsize)
        return b"".join((header, bitshuffle.compress_lz4(arr.reshape(-1), block)))

    def max_encoded_size(self, nbytes: int, itemsize: int) -> int:
        size = nbytes // itemsize
        block = self.block_elements(itemsize)
        lib = _bitshuffle_c()
        if lib is not None:
            return _HEADER + int(lib.bshuf_compress_lz4_bound(size, itemsize, block))
        # LZ4_compressBound per block plus bitshuffle's 4-byte block header, one extra block
        block_bytes = block * itemsize
        nblocks = size // block + 1
        return _HEADER + nblocks * (block_bytes + block_bytes // 255 + 16 + 4)

    def encode_into(self, chunk: np.ndarray, out: np.ndarray) -> np.ndarray:
        lib = _bitshuffle_c()
        if lib is None:
            return super().encode_into(chunk, out)
        _single_threaded_openmp()
        arr = np.ascontiguousarray(chunk)
        block = self.block_elements(arr.itemsize)
        view = _check_out(out, self.max_encoded_size(arr.nbytes, arr.itemsize))
        view[:_HEADER] = np.frombuffer(
            struct.pack(">QI", arr.nbytes, block * arr.itemsize), np.uint8
        )
        # a ctypes call releases the GIL, like bitshuffle.compress_lz4
        n = lib.bshuf_compress_lz4(
            arr.ctypes.data, view.ctypes.data + _HEADER, arr.size, arr.itemsize, block
        )
        if n < 0:
            raise RuntimeError(f"bitshuffle compression failed (error {n})")
        return view[: _HEADER + n]

    def dataset_kwargs(self) -> dict[str, Any]:
        import hdf5plugin

        return dict(hdf5plugin.Bitshuffle(nelems=self.nelems, cname="lz4"))


_HEADER = 12  # bitshuffle filter chunk header: 8-byte size + 4-byte block size

#: HDF5 filter ids (registered with the HDF Group), as in hdf5plugin.
ZSTD_H5FILTER = 32015
LZ4_H5FILTER = 32004
BLOSC_H5FILTER = 32001
_zstd_local = threading.local()


@register_codec
@dataclass(frozen=True)
class Zstd(Codec):
    """Zstandard, HDF5 filter 32015, as ``hdf5plugin.Zstd(clevel)``.

    A chunk is one zstd frame that records its content size (what the filter's decoder needs).
    Each thread has its own compressor: one compression context shared by threads is not safe.
    ``python-zstandard`` releases the GIL while it compresses.
    """

    name: ClassVar[str] = "zstd"
    level: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.level, bool) or not isinstance(self.level, int) or not (
            -7 <= self.level <= 22 and self.level != 0
        ):
            raise ConfigError(
                f"zstd level must be from 1 to 22 (or -7 to -1, faster). Got {self.level!r} "
                "instead.",
                key="codec.level",
            )

    def _compressor(self) -> Any:
        import zstandard

        cache = getattr(_zstd_local, "compressors", None)
        if cache is None:
            cache = _zstd_local.compressors = {}
        comp = cache.get(self.level)
        if comp is None:
            comp = cache[self.level] = zstandard.ZstdCompressor(
                level=self.level, write_content_size=True, write_checksum=False
            )
        return comp

    def encode(self, chunk: np.ndarray) -> bytes:
        arr = np.ascontiguousarray(chunk)
        return self._compressor().compress(arr.reshape(-1).view(np.uint8))

    def max_encoded_size(self, nbytes: int, itemsize: int) -> int:
        # ZSTD_COMPRESSBOUND plus room for the frame header
        small = ((128 << 10) - nbytes) >> 11 if nbytes < 128 << 10 else 0
        return nbytes + (nbytes >> 8) + small + 64

    def dataset_kwargs(self) -> dict[str, Any]:
        import hdf5plugin

        return dict(hdf5plugin.Zstd(clevel=max(self.level, 1)))


@register_codec
@dataclass(frozen=True)
class LZ4(Codec):
    """LZ4, HDF5 filter 32004, as ``hdf5plugin.LZ4(nbytes)``.

    Chunk bytes: uncompressed size (8 bytes, big-endian), block size (4 bytes, big-endian),
    then per block its compressed size (4 bytes, big-endian) and the raw LZ4 block; a block
    that does not shrink is stored as it is with its own size, as the filter does. ``nbytes``
    is the block size in bytes (0: the filter's default, 1 GiB, i.e. one block per chunk).
    ``lz4.block`` releases the GIL while it compresses.
    """

    name: ClassVar[str] = "lz4"
    nbytes: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.nbytes, bool) or not isinstance(self.nbytes, int) or not (
            0 <= self.nbytes <= 0x7E000000
        ):
            raise ConfigError(
                f"lz4 nbytes must be from 0 to 2113929216. Got {self.nbytes!r} instead.",
                key="codec.nbytes",
            )

    def encode(self, chunk: np.ndarray) -> bytes:
        import lz4.block

        arr = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
        total = arr.nbytes
        block = min(self.nbytes or 1 << 30, total) or 1
        parts = [struct.pack(">QI", total, block)]
        for start in range(0, total, block):
            raw = arr[start : start + block]
            packed = lz4.block.compress(raw, mode="default", store_size=False)
            if len(packed) >= raw.nbytes:
                packed = raw.tobytes()
            parts += (struct.pack(">I", len(packed)), packed)
        return b"".join(parts)

    def max_encoded_size(self, nbytes: int, itemsize: int) -> int:
        block = min(self.nbytes or 1 << 30, nbytes) or 1
        nblocks = max(1, -(-nbytes // block))
        return _HEADER + nblocks * (block + block // 255 + 16 + 4)

    def dataset_kwargs(self) -> dict[str, Any]:
        import hdf5plugin

        return dict(hdf5plugin.LZ4(nbytes=self.nbytes))


_BLOSC_CNAMES = ("blosclz", "lz4", "lz4hc", "zlib", "zstd")
_blosc_lock = threading.Lock()
_blosc_ready = False


def _blosc() -> Any:
    """c-blosc1 set up for calling from worker threads: GIL released, one internal thread."""
    global _blosc_ready
    import blosc

    if not _blosc_ready:
        with _blosc_lock:
            if not _blosc_ready:
                blosc.set_releasegil(True)
                blosc.set_nthreads(1)  # parallelism comes from our workers
                _blosc_ready = True
    return blosc


@register_codec
@dataclass(frozen=True)
class Blosc(Codec):
    """Blosc (c-blosc1), HDF5 filter 32001, as ``hdf5plugin.Blosc(cname, clevel, shuffle)``.

    A chunk is one c-blosc1 buffer (its own 16-byte header holds sizes, type size and
    shuffle). ``shuffle`` is 0 (none), 1 (byte) or 2 (bit). calstream makes python-blosc
    release the GIL and use one internal thread.
    """

    name: ClassVar[str] = "blosc"
    cname: str = "lz4"
    clevel: int = 5
    shuffle: int = 1

    def __post_init__(self) -> None:
        if self.cname not in _BLOSC_CNAMES:
            raise ConfigError(
                f"blosc compressor must be one of {', '.join(_BLOSC_CNAMES)}. "
                f"Got {self.cname!r} instead.",
                key="codec.cname",
            )
        if isinstance(self.clevel, bool) or not isinstance(self.clevel, int) or not (
            0 <= self.clevel <= 9
        ):
            raise ConfigError(
                f"blosc level must be from 0 to 9. Got {self.clevel!r} instead.",
                key="codec.clevel",
            )
        if self.shuffle not in (0, 1, 2):
            raise ConfigError(
                f"blosc shuffle must be 0, 1 or 2. Got {self.shuffle!r} instead.",
                key="codec.shuffle",
            )

    def encode(self, chunk: np.ndarray) -> bytes:
        blosc = _blosc()
        arr = np.ascontiguousarray(chunk)
        if arr.nbytes > blosc.MAX_BUFFERSIZE:
            raise ValueError(f"a chunk of {arr.nbytes} bytes is too large for blosc")
        return blosc.compress_ptr(
            arr.ctypes.data, arr.size, arr.itemsize, self.clevel, self.shuffle, self.cname
        )

    def max_encoded_size(self, nbytes: int, itemsize: int) -> int:
        return nbytes + 16 + 64  # BLOSC_MAX_OVERHEAD

    def dataset_kwargs(self) -> dict[str, Any]:
        import hdf5plugin

        return dict(
            hdf5plugin.Blosc(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle)
        )


def _check_out(out: np.ndarray, need: int) -> np.ndarray:
    if not (
        isinstance(out, np.ndarray)
        and out.dtype == np.uint8
        and out.ndim == 1
        and out.flags.c_contiguous
        and out.flags.writeable
    ):
        raise ValueError("out must be a writable, contiguous 1-D uint8 array")
    if out.size < need:
        raise ValueError(f"out must hold at least {need} bytes. Got {out.size} instead.")
    return out


# --- bitshuffle's C functions -------------------------------------------------------------

_bshuf_lib: ctypes.CDLL | None = None
_bshuf_searched = False


def _bitshuffle_c() -> ctypes.CDLL | None:
    """bitshuffle's C API (exported by its extension module), or None if not exported."""
    global _bshuf_lib, _bshuf_searched
    if not _bshuf_searched:
        with _omp_lock:
            if not _bshuf_searched:
                import bitshuffle.ext

                try:
                    lib = ctypes.CDLL(bitshuffle.ext.__file__)
                    size_t = ctypes.c_size_t
                    lib.bshuf_compress_lz4.restype = ctypes.c_int64
                    lib.bshuf_compress_lz4.argtypes = [
                        ctypes.c_void_p,
                        ctypes.c_void_p,
                        size_t,
                        size_t,
                        size_t,
                    ]
                    lib.bshuf_compress_lz4_bound.restype = size_t
                    lib.bshuf_compress_lz4_bound.argtypes = [size_t, size_t, size_t]
                    _bshuf_lib = lib
                except (OSError, AttributeError):
                    log.debug("bitshuffle's C functions are not exported: encode_into copies")
                _bshuf_searched = True
    return _bshuf_lib


# --- bitshuffle's OpenMP runtime --------------------------------------------------------------

_omp_lib: ctypes.CDLL | None = None
_omp_searched = False
_omp_thread = threading.local()


def _find_bitshuffle_openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime bitshuffle's extension uses, loaded (again) through ctypes.

    dlopen() of a library that is already loaded returns the same handle, so the functions
    act on the very runtime bitshuffle calls into.
    """
    import bitshuffle.ext

    candidates: list[str] = []
    pkg = Path(bitshuffle.ext.__file__).resolve().parent
    # auditwheel puts a private, renamed copy next to the package: bitshuffle.libs/libgomp-*.so*
    candidates += sorted(str(p) for p in pkg.parent.glob("bitshuffle.libs/libgomp*.so*"))
    candidates += sorted(str(p) for p in pkg.glob("*.libs/libgomp*.so*"))
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
        candidates += sorted(set(re.findall(r"/\S*lib[gi]omp[^/\s]*\.so[^/\s]*", text)))
    except OSError:
        pass
    if found := ctypes.util.find_library("gomp"):
        candidates.append(found)
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            lib.omp_set_num_threads.restype = None
            lib.omp_get_max_threads.restype = ctypes.c_int
        except (OSError, AttributeError):
            continue
        log.debug("bitshuffle OpenMP runtime: %s", path)
        return lib
    log.debug(
        "no OpenMP runtime found for bitshuffle; set OMP_NUM_THREADS=1 to keep each call on one "
        "thread"
    )
    return None


def _openmp() -> ctypes.CDLL | None:
    global _omp_lib, _omp_searched
    if not _omp_searched:
        with _omp_lock:
            if not _omp_searched:
                _omp_lib = _find_bitshuffle_openmp()
                _omp_searched = True
    return _omp_lib


def _single_threaded_openmp() -> None:
    """Make bitshuffle calls made by the current thread use one OpenMP thread (once per thread)."""
    if getattr(_omp_thread, "done", False):
        return
    lib = _openmp()
    if lib is not None:
        lib.omp_set_num_threads(1)
    _omp_thread.done = True


def _openmp_max_threads() -> int | None:
    """OpenMP threads a bitshuffle call made by the current thread would use (for tests)."""
    lib = _openmp()
    return None if lib is None else int(lib.omp_get_max_threads())
