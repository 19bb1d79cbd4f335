"""EuXFEL HDF5 ("EXDF") corrected-data files, in the layout EXtra-data reads.

A file holds one detector module (one INSTRUMENT source) for a run of consecutive trains::

    METADATA/dataFormatVersion             [b'1.0']
    METADATA/dataSources/{dataSourceId, root, deviceId}
    METADATA/{creationDate, updateDate, daqLibrary, karaboFramework,
              proposalNumber, runNumber, sequenceNumber}
    METADATA/calstream                     our provenance (attrs + 'provenance' JSON)
    INDEX/trainId (u8), INDEX/flag (i4), INDEX/timestamp (u8, ns)
    INDEX/<source>/data/{first, count}     (u8, one entry per train)
    INSTRUMENT/<source>/data/adc           (entries, cells, 512, 1024) float32, one chunk per frame
    INSTRUMENT/<source>/data/{gain, mask}  uint8 / uint32, same shape and chunks
    INSTRUMENT/<source>/data/{memoryCell, frameNumber}  (entries, cells)
    INSTRUMENT/<source>/data/trainId       (entries,)

For JUNGFRAU an entry is a train (memory cells on axis 1): a train whose module is missing gets
``count`` 0 and no entry, so the datasets hold exactly the trains with data, contiguously, and
``INDEX first/count`` map trains to entries. XTDF detectors (AGIPD, LPD) have one entry per
frame in group ``image`` (``image/{data, gain, mask}`` (frames, ss, fs), ``image/{trainId,
pulseId, cellId}``, ``count`` = frames of the train); ePix100 one entry per train without a
cell axis (``data/image/{pixels, gain, mask}`` (trains, ss, fs)). The per-detector dataset
list is data (:class:`ExdfLayout`, :func:`layout_for`), not code.

Only cheap work happens per train: the big datasets receive chunks compressed elsewhere
(``dset.id.write_direct_chunk``), the small per-train values and the index are kept in memory
and written once when the file is closed.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from calstream.errors import CalstreamError, ConfigError, DataError, StoreError
from calstream.store.codecs import Codec
from calstream.store.records import FileInfo
from calstream.store.spool import (
    MODULE_RANGE,
    RUN_RANGE,
    SEQUENCE_RANGE,
    Spool,
    check_int,
    corr_filename,
)

__all__ = [
    "EPIX100_LAYOUT",
    "JUNGFRAU_LAYOUT",
    "PROPOSAL_RANGE",
    "XTDF_LAYOUT",
    "ExdfFileWriter",
    "ExdfLayout",
    "SequenceWriter",
    "check_source_name",
    "layout_for",
    "read_file_info",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = "1.0"
#: An encoded chunk: bytes or any contiguous buffer (e.g. a view from ``Codec.encode_into``).
Buffer = bytes | bytearray | memoryview | np.ndarray
_SOURCE_RE = re.compile(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*:[A-Za-z0-9_\-]+")
#: Valid proposal numbers (inclusive): ``METADATA/proposalNumber`` is a uint32.
PROPOSAL_RANGE = (0, 2**32 - 1)


def check_source_name(name: str, *, key: str = "source") -> None:
    """Raise ConfigError(key=key) unless ``name`` is a source name the files can hold.

    Like ``'SPB_IRDA_JF4M/CORR/JNGFR01:output'``: slash-separated words of letters, digits,
    ``_`` and ``-``, then ``:`` and the output channel. It becomes an HDF5 group path, so
    nothing else (no ``..``, spaces, leading ``/``) is allowed.
    """
    if not (isinstance(name, str) and _SOURCE_RE.fullmatch(name)):
        raise ConfigError(
            f"source must look like 'DET/CORR/NAME:output'. Got {name!r} instead.", key=key
        )


@dataclass(frozen=True)
class ExdfLayout:
    """The datasets a detector family has in its corrected files.

    ``images`` are per-frame pixel arrays (name relative to ``group``, dtype), stored as one
    pre-encoded chunk per frame; ``per_cell`` are small per-frame values. With ``per_frame``
    (XTDF) every frame is an entry and a train's ``count`` is its number of frames; otherwise
    an entry is a train, with the frames (memory cells) on axis 1 when ``cell_axis``
    (JUNGFRAU) or exactly one frame and no such axis (ePix100).
    """

    group: str
    images: tuple[tuple[str, str], ...]
    per_cell: tuple[tuple[str, str], ...]
    per_frame: bool = False
    cell_axis: bool = True

    @property
    def image_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.images)

    @property
    def per_cell_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.per_cell)


#: Corrected JUNGFRAU: group ``data``, keys as in the facility's files.
JUNGFRAU_LAYOUT = ExdfLayout(
    group="data",
    images=(("adc", "float32"), ("gain", "uint8"), ("mask", "uint32")),
    per_cell=(("memoryCell", "uint8"), ("frameNumber", "uint64")),
)

#: Corrected AGIPD / LPD (XTDF): group ``image``, one entry per frame.
XTDF_LAYOUT = ExdfLayout(
    group="image",
    images=(("data", "float32"), ("gain", "uint8"), ("mask", "uint32")),
    per_cell=(("cellId", "uint16"), ("pulseId", "uint64")),
    per_frame=True,
)

#: Corrected ePix100: group ``data``, one frame per train, keys ``data.image.*``.
EPIX100_LAYOUT = ExdfLayout(
    group="data",
    images=(("image/pixels", "float32"), ("image/gain", "uint8"), ("image/mask", "uint32")),
    per_cell=(),
    cell_axis=False,
)

_LAYOUTS = {"jungfrau": JUNGFRAU_LAYOUT, "xtdf": XTDF_LAYOUT, "epix100": EPIX100_LAYOUT}


def layout_for(kind: str, data_dtype: Any = np.float32) -> ExdfLayout:
    """A corrected-file layout (``"jungfrau"``, ``"xtdf"``, ``"epix100"``: a detector spec's
    ``exdf_layout``), its first image (the corrected data) of ``data_dtype`` (int16 for photon
    counts)."""
    try:
        layout = _LAYOUTS[kind]
    except KeyError:
        raise ConfigError(
            f"no file layout {kind!r}; known: {', '.join(_LAYOUTS)}", key="exdf_layout"
        ) from None
    (name, _), *rest = layout.images
    return replace(layout, images=((name, np.dtype(data_dtype).name), *rest))


def _calstream_version() -> str:
    try:
        from importlib.metadata import version

        return version("calstream")
    except Exception:
        return "unknown"


def _h5_date(when: datetime) -> np.ndarray:
    return np.array([when.strftime("%Y%m%dT%H%M%SZ").encode("ascii")])


def _json(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


class ExdfFileWriter:
    """Write one corrected EuXFEL file for one detector module.

    Parameters
    ----------
    path
        The new file (must not exist).
    source
        INSTRUMENT source name, e.g. ``'SPB_IRDA_JF4M/CORR/JNGFR01:output'``.
    cells
        Frames (memory cells) per train.
    frame_shape
        Pixels per frame (slow scan, fast scan).
    codecs
        The codec of each image dataset, e.g. ``{'adc': ..., 'gain': ..., 'mask': ...}``; the
        chunks given to :meth:`write_train` must be encoded with them.
    run, proposal, sequence
        Recorded in METADATA.
    provenance
        Calibration provenance (constants used, ...), stored as JSON in
        ``METADATA/calstream/provenance`` and returned as ``FileInfo.constants``.
    max_trains
        Trains this file may hold.
    detector, module, relpath
        For the returned :class:`FileInfo` (``relpath`` defaults to ``r{run:04d}/{name}``).
    layout
        The detector family's datasets.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        source: str,
        cells: int,
        frame_shape: tuple[int, int] = (512, 1024),
        codecs: Mapping[str, Codec],
        run: int,
        proposal: int,
        sequence: int,
        provenance: Mapping[str, Any],
        max_trains: int,
        detector: str = "jungfrau",
        module: int = 0,
        relpath: str | None = None,
        layout: ExdfLayout = JUNGFRAU_LAYOUT,
    ) -> None:
        self.path = Path(path)
        check_source_name(source)
        check_int("run", run, RUN_RANGE)
        check_int("proposal", proposal, PROPOSAL_RANGE)
        check_int("sequence", sequence, SEQUENCE_RANGE)
        check_int("module", module, MODULE_RANGE)
        if not (isinstance(cells, int) and cells >= 1):
            raise ConfigError(f"cells must be a positive int. Got {cells!r} instead.", key="cells")
        if not (isinstance(max_trains, int) and max_trains >= 1):
            raise ConfigError(
                f"max_trains must be a positive int. Got {max_trains!r} instead.",
                key="max_trains",
            )
        missing = set(layout.image_names) - set(codecs)
        if missing:
            raise ConfigError(f"no codec for {sorted(missing)}", key="codecs")
        self.source = source
        self.cells = cells
        self.frame_shape = tuple(int(n) for n in frame_shape)
        self.codecs = {name: codecs[name] for name in layout.image_names}
        self.run, self.proposal, self.sequence = run, proposal, sequence
        self.provenance = dict(provenance)
        self.max_trains = max_trains
        self.detector, self.module = detector, module
        self.relpath = relpath if relpath is not None else f"r{run:04d}/{self.path.name}"
        self.layout = layout

        self._train_ids = np.zeros(max_trains, np.uint64)
        self._timestamps = np.zeros(max_trains, np.uint64)
        self._counts = np.zeros(max_trains, np.uint64)
        # Per-frame layouts keep one value per entry (frame), the others (trains, cells).
        per_cell_shape = (max_trains * cells,) if layout.per_frame else (max_trains, cells)
        self._per_cell = {
            name: np.zeros(per_cell_shape, dtype) for name, dtype in layout.per_cell
        }
        self.trains = 0  # trains recorded in INDEX
        self.entries = 0  # entries written: trains with data, or frames (per_frame)
        self.frames = 0
        self.bytes_written = 0  # compressed chunk bytes
        self._last_train = -1
        self._info: FileInfo | None = None
        self._file: h5py.File | None = None
        self._dsids: list[Any] = []
        existed = os.path.lexists(self.path)
        try:
            self._file = h5py.File(self.path, "x")
            self._write_metadata(self._file)
            grp = self._file.create_group(f"INSTRUMENT/{source}/{layout.group}")
            if layout.per_frame:
                entries, shape = max_trains * cells, self.frame_shape
            elif layout.cell_axis:
                entries, shape = max_trains, (cells, *self.frame_shape)
            else:
                entries, shape = max_trains, self.frame_shape
            for name, dtype in layout.images:
                ds = grp.create_dataset(
                    name,
                    shape=(entries, *shape),
                    maxshape=(None, *shape),
                    chunks=(*(1,) * (len(shape) - 1), *self.frame_shape),
                    dtype=dtype,
                    **self.codecs[name].dataset_kwargs(),
                )
                self._dsids.append(ds.id)
        except BaseException as exc:
            # Leave no half-written file behind (but never delete a file that was there).
            created = self._file is not None or (not existed and os.path.lexists(self.path))
            self._discard()
            if created:
                try:
                    self.path.unlink(missing_ok=True)
                except OSError:
                    log.warning("cannot delete the partial file %s", self.path, exc_info=True)
            if isinstance(exc, CalstreamError) or not isinstance(exc, Exception):
                raise
            raise StoreError(f"cannot create {self.path}: {exc}", source=source) from exc

    # --- per train --------------------------------------------------------------------

    def write_train(
        self,
        train_id: int,
        timestamp_ns: int,
        chunks: Mapping[str, Sequence[Buffer]] | None,
        small: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Append one train.

        ``chunks[key][c]`` is the encoded chunk of cell ``c`` for each image key (bytes or
        any buffer, e.g. the view :meth:`Codec.encode_into` returns); ``small``
        holds the per-cell values (``memoryCell``, ``frameNumber``: shape (cells,)).
        ``chunks=None`` records the train with no data for this module (INDEX count 0).

        Raises
        ------
        DataError
            Train id not above the previous one, file full, keys or lengths that do not fit
            (nothing is written then).
        StoreError
            HDF5 failed; the file should be aborted.
        """
        if self._file is None:
            raise StoreError(f"{self.path} is closed", source=self.source, train_id=train_id)
        train_id = int(train_id)
        if train_id <= 0:
            raise DataError("train ids must be positive", source=self.source, train_id=train_id)
        if train_id <= self._last_train:
            raise DataError(
                f"train ids must increase: {train_id} after {self._last_train}",
                source=self.source,
                train_id=train_id,
            )
        if self.trains >= self.max_trains:
            raise DataError(
                f"file {self.path.name} is full ({self.max_trains} trains)",
                source=self.source,
                train_id=train_id,
            )
        if timestamp_ns < 0:
            raise DataError(
                f"negative timestamp {timestamp_ns}", source=self.source, train_id=train_id
            )
        if chunks is not None:
            values, frames = self._check_train(train_id, chunks, small)
            entry = self.entries
            layout = self.layout
            try:
                for dsid, name in zip(self._dsids, layout.image_names, strict=True):
                    for cell, buf in enumerate(chunks[name]):
                        if layout.per_frame:
                            offset: tuple[int, ...] = (entry + cell, 0, 0)
                        elif layout.cell_axis:
                            offset = (entry, cell, 0, 0)
                        else:
                            offset = (entry, 0, 0)
                        dsid.write_direct_chunk(offset, buf)
            except (OSError, ValueError, RuntimeError, TypeError) as exc:
                raise StoreError(
                    f"writing to {self.path} failed: {exc}", source=self.source, train_id=train_id
                ) from exc
            count = frames if layout.per_frame else 1
            for name, value in values.items():
                if layout.per_frame:
                    self._per_cell[name][entry : entry + frames] = value
                else:
                    self._per_cell[name][entry] = value
            self.bytes_written += sum(
                memoryview(b).nbytes for name in layout.image_names for b in chunks[name]
            )
            self.entries += count
            self.frames += frames
            self._counts[self.trains] = count
        self._train_ids[self.trains] = train_id
        self._timestamps[self.trains] = timestamp_ns
        self.trains += 1
        self._last_train = train_id

    def _check_train(
        self,
        train_id: int,
        chunks: Mapping[str, Sequence[Buffer]],
        small: Mapping[str, np.ndarray] | None,
    ) -> tuple[dict[str, np.ndarray], int]:
        def fail(msg: str, key: str | None = None) -> DataError:
            return DataError(msg, source=self.source, train_id=train_id, key=key)

        if set(chunks) != set(self.layout.image_names):
            raise fail(
                f"chunks for {sorted(self.layout.image_names)} expected, got {sorted(chunks)}"
            )
        first = self.layout.image_names[0]
        frames = len(chunks[first])
        if self.layout.per_frame:
            if not 1 <= frames <= self.cells:
                raise fail(f"1 to {self.cells} chunks (one per frame) expected, got {frames}",
                           key=first)
        elif frames != (self.cells if self.layout.cell_axis else 1):
            want = self.cells if self.layout.cell_axis else 1
            raise fail(f"{want} chunks (one per cell) expected, got {frames}", key=first)
        for name, dtype in self.layout.images:
            if self.codecs[name].name == "none":  # unfiltered: HDF5 trusts the chunk size
                need = np.dtype(dtype).itemsize * int(np.prod(self.frame_shape))
                if any(memoryview(b).nbytes != need for b in chunks[name]):
                    raise fail(f"unfiltered chunks must be {need} bytes", key=name)
            if len(chunks[name]) != frames:
                raise fail(
                    f"{frames} chunks (one per frame) expected, got {len(chunks[name])}",
                    key=name,
                )
        small = small or {}
        if set(small) != set(self.layout.per_cell_names):
            raise fail(
                f"per-cell values for {sorted(self.layout.per_cell_names)} expected, "
                f"got {sorted(small)}"
            )
        values = {}
        n = frames if self.layout.per_frame else self.cells
        for name in self.layout.per_cell_names:
            value = np.asarray(small[name])
            if value.shape != (n,):
                raise fail(f"shape ({n},) expected, got {value.shape}", key=name)
            values[name] = value
        return values, frames

    # --- lifecycle --------------------------------------------------------------------

    def close(self) -> FileInfo:
        """Finish the file: trim the datasets to the trains written, write index and metadata.

        Safe to call twice (returns the same :class:`FileInfo`).
        """
        if self._info is not None:
            return self._info
        if self._file is None:
            raise StoreError(f"{self.path} was aborted", source=self.source)
        n, t = self.entries, self.trains
        try:
            f = self._file
            grp = f[f"INSTRUMENT/{self.source}/{self.layout.group}"]
            for name in self.layout.image_names:
                grp[name].resize(n, axis=0)
            for name, buf in self._per_cell.items():
                grp.create_dataset(name, data=buf[:n])
            counts = self._counts[:t]
            entry_trains = np.repeat(self._train_ids[:t], counts.astype(np.intp))
            grp.create_dataset("trainId", data=entry_trains)
            f.create_dataset("INDEX/trainId", data=self._train_ids[:t])
            f.create_dataset("INDEX/flag", data=np.ones(t, np.int32))
            f.create_dataset("INDEX/timestamp", data=self._timestamps[:t])
            first = np.zeros(t, np.uint64)
            np.cumsum(counts[:-1], out=first[1:])
            index = f.create_group(f"INDEX/{self.source}/{self.layout.group}")
            index.create_dataset("first", data=first)
            index.create_dataset("count", data=counts)
            f["METADATA/updateDate"] = _h5_date(datetime.now(UTC))
            f.close()
            self._file = None
            size = self.path.stat().st_size
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            self._discard()
            raise StoreError(f"closing {self.path} failed: {exc}", source=self.source) from exc

        frame_bytes = int(np.prod(self.frame_shape))
        raw = sum(np.dtype(dt).itemsize for _, dt in self.layout.images) * frame_bytes
        first_train = int(self._train_ids[0]) if t else 0
        last_train = int(self._train_ids[t - 1]) if t else 0
        self._info = FileInfo(
            path=self.path,
            relpath=self.relpath,
            size=size,
            run=self.run,
            proposal=self.proposal,
            sequence=self.sequence,
            detector=self.detector,
            module=self.module,
            sources=(self.source,),
            first_train=first_train,
            last_train=last_train,
            trains=t,
            frames=self.frames,
            compression={name: codec.spec for name, codec in self.codecs.items()},
            constants=self.provenance,
            raw_bytes=raw * self.frames,
        )
        log.debug("closed %s: %d trains, %d with data, %d bytes", self.path, t, n, size)
        return self._info

    def abort(self) -> None:
        """Close and delete the file (whatever state it is in)."""
        self._discard()
        self._info = None
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete {self.path}: {exc.strerror}") from exc

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # already failing: the original error is the one to report
                log.debug("closing %s after an error failed", self.path, exc_info=True)
            self._file = None

    def __enter__(self) -> ExdfFileWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # --- metadata ---------------------------------------------------------------------

    def _write_metadata(self, f: h5py.File) -> None:
        version = _calstream_version()
        f.attrs["writer"] = f"calstream {version}"
        meta = f.create_group("METADATA")
        meta["dataFormatVersion"] = np.array([FORMAT_VERSION.encode("ascii")])
        sources = meta.create_group("dataSources")
        vlen = h5py.special_dtype(vlen=bytes)
        source_id = f"INSTRUMENT/{self.source}/{self.layout.group}"
        sources.create_dataset(
            "dataSourceId", data=[source_id.encode()], dtype=vlen, maxshape=(None,)
        )
        sources.create_dataset("root", data=[b"INSTRUMENT"], dtype=vlen, maxshape=(None,))
        sources.create_dataset(
            "deviceId", data=[source_id.split("/", 1)[1].encode()], dtype=vlen, maxshape=(None,)
        )
        meta["creationDate"] = _h5_date(datetime.now(UTC))
        meta["daqLibrary"] = np.array([f"calstream-{version}".encode()])
        meta["karaboFramework"] = np.array([b"n/a"])
        meta.create_dataset("proposalNumber", data=[self.proposal], dtype=np.uint32)
        meta.create_dataset("runNumber", data=[self.run], dtype=np.uint32)
        meta.create_dataset("sequenceNumber", data=[self.sequence], dtype=np.uint32)
        ours = meta.create_group("calstream")
        ours.attrs["version"] = version
        ours.attrs["detector"] = self.detector
        ours.attrs["module"] = self.module
        ours.attrs["codecs"] = _json({k: c.to_dict() for k, c in self.codecs.items()})
        ours.create_dataset("provenance", data=_json(self.provenance), dtype=h5py.string_dtype())


class SequenceWriter:
    """Write a module's trains into a run of sequence files in the spool, rolling over.

    Files are ``CORR-R{run:04d}-{AGG}{module:02d}-S{seq:05d}.h5`` in ``spool.building``;
    a file is closed after ``trains_per_file`` trains (or once its compressed chunks exceed
    ``max_file_bytes``), moved to ``spool.complete`` and its :class:`FileInfo` returned by the
    :meth:`write_train` call that closed it. Sequence numbers start at ``first_sequence``, by
    default after the highest the spool knows for this run and module.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        run: int,
        proposal: int,
        detector: str,
        module: int,
        aggregator: str,
        source: str,
        cells: int,
        codecs: Mapping[str, Codec],
        trains_per_file: int,
        provenance: Mapping[str, Any],
        frame_shape: tuple[int, int] = (512, 1024),
        max_file_bytes: int | None = None,
        first_sequence: int | None = None,
        layout: ExdfLayout = JUNGFRAU_LAYOUT,
    ) -> None:
        if not (isinstance(trains_per_file, int) and trains_per_file >= 1):
            raise ConfigError(
                f"trains_per_file must be a positive int. Got {trains_per_file!r} instead.",
                key="trains_per_file",
            )
        self.spool = spool
        self.run, self.proposal = run, proposal
        self.detector, self.module, self.aggregator = detector, module, aggregator
        self.source, self.cells, self.frame_shape = source, cells, frame_shape
        self.codecs = dict(codecs)
        self.trains_per_file = trains_per_file
        self.max_file_bytes = max_file_bytes
        self.provenance = dict(provenance)
        self.layout = layout
        if first_sequence is None:
            first_sequence = spool.next_sequence(run, aggregator, module)
        corr_filename(run, aggregator, module, first_sequence)  # validates the name parts
        self.sequence = first_sequence  # of the next file to open
        self._writer: ExdfFileWriter | None = None
        self._last_train = -1
        self.files_closed = 0

    @property
    def current(self) -> ExdfFileWriter | None:
        """The file being written, if any."""
        return self._writer

    def write_train(
        self,
        train_id: int,
        timestamp_ns: int,
        chunks: Mapping[str, Sequence[Buffer]] | None,
        small: Mapping[str, np.ndarray] | None = None,
    ) -> list[FileInfo]:
        """Append one train (see :meth:`ExdfFileWriter.write_train`).

        Returns the files this call completed (moved to ``spool.complete``), usually none.
        """
        if int(train_id) <= self._last_train:
            raise DataError(
                f"train ids must increase: {train_id} after {self._last_train}",
                source=self.source,
                train_id=train_id,
            )
        writer = self._writer or self._open()
        try:
            writer.write_train(train_id, timestamp_ns, chunks, small)
        except StoreError:
            self._fail()
            raise
        self._last_train = int(train_id)
        full = writer.trains >= self.trains_per_file or (
            self.max_file_bytes is not None and writer.bytes_written >= self.max_file_bytes
        )
        info = self._finish(writer) if full else None
        return [info] if info is not None else []

    def close(self) -> FileInfo | None:
        """Close the open file and return its :class:`FileInfo`.

        None if no file is open, or if the open one has no trains at all (e.g. every write
        was refused): such a file is deleted, never completed.
        """
        return self._finish(self._writer) if self._writer is not None else None

    def abort(self) -> None:
        """Give up the open file: it moves to ``spool.failed`` (deleted if it has no trains)."""
        if self._writer is not None:
            self._fail()

    def _open(self) -> ExdfFileWriter:
        name = corr_filename(self.run, self.aggregator, self.module, self.sequence)
        self._writer = ExdfFileWriter(
            self.spool.building_path(name),
            source=self.source,
            cells=self.cells,
            frame_shape=self.frame_shape,
            codecs=self.codecs,
            run=self.run,
            proposal=self.proposal,
            sequence=self.sequence,
            provenance=self.provenance,
            max_trains=self.trains_per_file,
            detector=self.detector,
            module=self.module,
            relpath=f"r{self.run:04d}/{name}",
            layout=self.layout,
        )
        self.sequence += 1
        return self._writer

    def _finish(self, writer: ExdfFileWriter) -> FileInfo | None:
        self._writer = None
        if writer.trains == 0:
            self._drop_empty(writer)
            return None
        try:
            info = writer.close()
        except StoreError:
            self._move_failed(writer.path)
            raise
        complete = self.spool.mark_complete(info.path)
        self.files_closed += 1
        return replace(info, path=complete)

    def _fail(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if writer.trains == 0:
            self._drop_empty(writer)
            return
        writer._discard()
        self._move_failed(writer.path)

    def _drop_empty(self, writer: ExdfFileWriter) -> None:
        """Delete a file without trains; its sequence number is used for the next file."""
        writer.abort()
        log.debug("deleted %s: no trains were written to it", writer.path.name)
        if self.sequence == writer.sequence + 1:
            self.sequence = writer.sequence

    def _move_failed(self, path: Path) -> None:
        if path.exists():
            dst = self.spool.mark_failed(path)
            log.warning("file %s failed; moved to %s", path.name, dst)


def read_file_info(path: str | os.PathLike[str]) -> FileInfo:
    """Rebuild the :class:`FileInfo` of a file calstream wrote (e.g. found by ``Spool.recover``).

    Raises
    ------
    StoreError
        The file cannot be read or was not written by calstream.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            meta = f["METADATA"]
            ours = meta["calstream"]
            run = int(meta["runNumber"][0])
            source_ids = [s.decode() for s in meta["dataSources/dataSourceId"][:]]
            sources = tuple(s.partition("/")[2].rpartition("/")[0] for s in source_ids)
            train_ids = f["INDEX/trainId"][:]
            train_ids = train_ids[train_ids != 0]
            frames = raw = 0
            for src_id, src in zip(source_ids, sources, strict=True):
                group = src_id.rpartition("/")[2]
                counts = f[f"INDEX/{src}/{group}/count"][:]
                images = _image_datasets(f[f"INSTRUMENT/{src}/{group}"])
                for ds in images:
                    raw += ds.size * ds.dtype.itemsize
                # (trains, cells, ss, fs): cells frames per entry; else one frame per entry
                cells = images[0].shape[1] if images and images[0].ndim == 4 else 1
                frames += int(counts.sum()) * cells
            codecs = json.loads(ours.attrs["codecs"])
            return FileInfo(
                path=path,
                relpath=f"r{run:04d}/{path.name}",
                size=path.stat().st_size,
                run=run,
                proposal=int(meta["proposalNumber"][0]),
                sequence=int(meta["sequenceNumber"][0]),
                detector=str(ours.attrs["detector"]),
                module=int(ours.attrs["module"]),
                sources=sources,
                first_train=int(train_ids[0]) if len(train_ids) else 0,
                last_train=int(train_ids[-1]) if len(train_ids) else 0,
                trains=len(train_ids),
                frames=frames,
                compression={k: _codec_spec(v) for k, v in codecs.items()},
                constants=json.loads(ours["provenance"][()]),
                raw_bytes=raw,
            )
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise StoreError(f"cannot read file info from {path}: {exc}") from exc


def _image_datasets(group: h5py.Group) -> list[h5py.Dataset]:
    """The pixel datasets (3 or more axes) under ``group``, nested ones included."""
    found: list[h5py.Dataset] = []

    def visit(_name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.ndim >= 3:
            found.append(obj)

    group.visititems(visit)
    return found


def _codec_spec(options: dict[str, Any]) -> str:
    """A codec's configuration text from its METADATA record; the name if it is not known."""
    from calstream.store.codecs import get_codec

    try:
        return get_codec(**options).spec
    except (ConfigError, TypeError):
        return str(options.get("name", "?"))
