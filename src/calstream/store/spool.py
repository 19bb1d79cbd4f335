"""The local spool: files are written here and only leave once they are complete.

Layout below the spool root::

    building/   files being written (a crash leaves them here)
    complete/   closed files waiting to be stored at the destination
    failed/     files from a crashed run or a failed write, kept for inspection
    kept/       stored files kept in the spool (``retention = "keep"``), for local analysis
    stored/     markers named after files already stored and removed, so that sequence
                numbers (and train ids, see :meth:`Spool.last_train_ids`) continue after a
                restart instead of clashing at the destination. A marker holds
                ``{"last_train": N}`` (JSON); markers of older versions are empty.

All moves between these folders are renames within one filesystem, so a file is in exactly
one of them at any time, even after ``kill -9``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import h5py
import numpy as np

from calstream.errors import ConfigError, StoreError

__all__ = [
    "MODULE_RANGE",
    "RETENTIONS",
    "RUN_RANGE",
    "SEQUENCE_RANGE",
    "Spool",
    "SpoolLimit",
    "check_int",
    "corr_filename",
    "parse_corr_filename",
]

log = logging.getLogger(__name__)

#: Valid run numbers (inclusive): four digits in file names (``R{run:04d}``).
RUN_RANGE = (0, 9999)
#: Valid module numbers (inclusive): two digits in file names.
MODULE_RANGE = (0, 99)
#: Valid sequence numbers (inclusive): five digits in file names.
SEQUENCE_RANGE = (0, 99999)
#: What happens to a spool file once it is stored.
RETENTIONS = ("delete", "keep")

_AGGREGATOR_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,15}")
_CORR_RE = re.compile(
    r"CORR-R(?P<run>\d{4})-(?P<aggregator>[A-Za-z][A-Za-z0-9]*?)(?P<module>\d{2})"
    r"-S(?P<sequence>\d{5})\.h5"
)


def corr_filename(run: int, aggregator: str, module: int, sequence: int) -> str:
    """The facility's corrected-file name, ``CORR-R{run:04d}-{AGG}{module:02d}-S{seq:05d}.h5``.

    Raises
    ------
    ConfigError
        A number out of range or an aggregator that is not a short alphanumeric word: these
        end up in file names and must not produce paths.
    """
    check_int("run", run, RUN_RANGE)
    check_int("module", module, MODULE_RANGE)
    check_int("sequence", sequence, SEQUENCE_RANGE)
    if not (isinstance(aggregator, str) and _AGGREGATOR_RE.fullmatch(aggregator)):
        raise ConfigError(
            "aggregator must be a short alphanumeric word like 'JNGFR'. "
            f"Got {aggregator!r} instead.",
            key="aggregator",
        )
    return f"CORR-R{run:04d}-{aggregator}{module:02d}-S{sequence:05d}.h5"


def check_int(key: str, value: object, bounds: tuple[int, int]) -> None:
    """Raise ConfigError(key=key) unless ``value`` is an int (not a bool) within ``bounds``.

    ``bounds`` is inclusive, e.g. ``check_int("output.run", run, RUN_RANGE)``.
    """
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(
            f"{key} must be an int from {lo} to {hi}. Got {value!r} instead.", key=key
        )


def parse_corr_filename(name: str) -> tuple[int, str, int, int] | None:
    """``(run, aggregator, module, sequence)`` of a corrected-file name, None for other names."""
    m = _CORR_RE.fullmatch(name)
    if m is None:
        return None
    return int(m["run"]), m["aggregator"], int(m["module"]), int(m["sequence"])


class Spool:
    """A spool directory with ``building/``, ``complete/``, ``failed/`` (and ``stored/``).

    Parameters
    ----------
    root
        The spool directory, created if missing. Keep it on a local filesystem.
    fsync
        Flush a file's data to disk before it is marked complete (and the directories after
        each move), so a power loss cannot leave a complete-looking file with lost data.
        Process crashes (``kill -9``) are safe without it; turn it off only for benchmarks.
    retention
        ``"delete"`` a file once it is stored, or ``"keep"`` it in ``kept/``.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, fsync: bool = True, retention: str = "delete"
    ) -> None:
        if retention not in RETENTIONS:
            raise ConfigError(
                f"retention must be one of {', '.join(RETENTIONS)}. Got {retention!r} instead.",
                key="output.retention",
            )
        self.root = Path(root).absolute()
        self.fsync = fsync
        self.retention = retention
        self.building = self.root / "building"
        self.complete = self.root / "complete"
        self.failed = self.root / "failed"
        self.stored = self.root / "stored"
        self.kept = self.root / "kept"
        folders = [self.building, self.complete, self.failed, self.stored]
        if retention == "keep":
            folders.append(self.kept)
        for d in folders:
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create spool directory {d}: {exc.strerror}") from exc

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r})"

    # --- paths --------------------------------------------------------------------------

    def building_path(self, name: str) -> Path:
        """Where a new file called ``name`` is written (a plain file name, nothing else)."""
        _check_name(name)
        return self.building / name

    def _own(self, path: str | os.PathLike[str], folder: Path) -> Path:
        path = Path(path)
        if path.parent.resolve() != folder.resolve():
            raise StoreError(f"{path} is not in the spool's {folder.name}/ folder ({folder})")
        _check_name(path.name)
        return folder / path.name

    # --- moves --------------------------------------------------------------------------

    def mark_complete(self, path: str | os.PathLike[str]) -> Path:
        """Move a closed file from ``building/`` to ``complete/``; returns its new path."""
        src = self._own(path, self.building)
        dst = self.complete / src.name
        if self.fsync:
            _fsync_file(src)
        self._rename(src, dst)
        return dst

    def mark_failed(self, path: str | os.PathLike[str]) -> Path:
        """Move a file from ``building/`` or ``complete/`` to ``failed/``; returns its new path."""
        path = Path(path)
        in_complete = path.parent.resolve() == self.complete.resolve()
        folder = self.complete if in_complete else self.building
        src = self._own(path, folder)
        dst = _free_name(self.failed / src.name)
        self._rename(src, dst)
        return dst

    def remove(self, path: str | os.PathLike[str], *, last_train: int | None = None) -> None:
        """Forget a complete file once it is stored: delete it (or move it to ``kept/``, with
        ``retention = "keep"``) and leave a ``stored/`` marker.

        ``last_train`` (the file's ``FileInfo.last_train``) is kept in the marker, for
        :meth:`last_train_ids`. A file already gone (e.g. moved away by the destination) is
        fine; removing it again without ``last_train`` keeps the marker's content.
        """
        src = self._own(path, self.complete)
        marker = self.stored / src.name
        try:
            if last_train is not None:
                self._write_marker(marker, int(last_train))
            elif not marker.exists():
                marker.touch()
            if self.retention == "keep" and src.exists():
                os.replace(src, self.kept / src.name)
            else:
                src.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot remove {src} from the spool: {exc.strerror}") from exc
        if self.fsync:
            _fsync_dir(self.complete)
            _fsync_dir(self.stored)
            if self.retention == "keep":
                _fsync_dir(self.kept)

    def usage(self) -> int:
        """Bytes of the files in the spool (building, complete, failed and kept)."""
        total = 0
        for folder in (self.building, self.complete, self.failed, self.kept):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"cannot list {folder}: {exc.strerror}") from exc
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    pass  # moved on while we looked
        return total

    def _write_marker(self, marker: Path, last_train: int) -> None:
        # Write aside and rename, so a crash never leaves a marker with a truncated number.
        tmp = marker.with_name(f".{marker.name}.tmp")
        with open(tmp, "w", encoding="ascii") as f:
            f.write(json.dumps({"last_train": last_train}) + "\n")
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, marker)

    def last_train_ids(self, run: int, aggregator: str | None = None) -> dict[int, int]:
        """``{module: highest train id}`` of the files the spool knows for ``run``.

        Looks at the ``stored/`` markers, ``complete/`` and ``failed/`` (files there that
        cannot be read, e.g. left unfinished by a crash, are skipped; ``building/`` is not
        looked at: :meth:`recover` empties it at start). A module whose files are all of
        unknown content (markers from older versions, unreadable files) maps to 0; modules
        without any file are absent. ``aggregator`` limits it to one detector's files.

        A restarted run must continue above these ids: EXtra-data refuses a run whose train
        ids repeat in different files.
        """
        highest: dict[int, int] = {}
        for folder in (self.stored, self.complete, self.failed):
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                raise StoreError(f"cannot list {folder}: {exc.strerror}") from exc
            for entry in entries:
                parsed = parse_corr_filename(re.sub(r"(\.h5)(\.\d+)$", r"\1", entry.name))
                if parsed is None or parsed[0] != run:
                    continue
                if aggregator is not None and parsed[1] != aggregator:
                    continue
                path = Path(entry.path)
                last = _marker_last_train(path) if folder == self.stored else _file_last_train(path)
                module = parsed[2]
                highest[module] = max(highest.get(module, 0), last)
        return highest

    def recover(self) -> list[Path]:
        """Clean up after a crash; returns the complete files still waiting to be stored.

        Files left in ``building/`` were never closed: they move to ``failed/`` with a warning.
        """
        for path in sorted(self.building.iterdir()):
            if not path.is_file() or path.is_symlink():
                continue
            dst = _free_name(self.failed / path.name)
            log.warning("unfinished spool file from an earlier run moved to %s", dst)
            self._rename(path, dst)
        return sorted(
            p for p in self.complete.iterdir() if p.is_file() and not p.name.startswith(".")
        )

    def next_sequence(self, run: int, aggregator: str, module: int) -> int:
        """The sequence number after the highest one in the spool for this run and module.

        Looks at ``building/``, ``complete/``, ``failed/`` and the ``stored/`` markers.
        """
        highest = -1
        for folder in (self.building, self.complete, self.failed, self.stored):
            for entry in os.scandir(folder):
                # failed/ may hold "name.1" duplicates: strip such suffixes
                name = re.sub(r"(\.h5)(\.\d+)$", r"\1", entry.name)
                parsed = parse_corr_filename(name)
                if parsed and parsed[:3] == (run, aggregator, module):
                    highest = max(highest, parsed[3])
        return highest + 1

    def _rename(self, src: Path, dst: Path) -> None:
        try:
            os.rename(src, dst)
        except OSError as exc:
            raise StoreError(f"cannot move {src} to {dst}: {exc.strerror}") from exc
        if self.fsync:
            _fsync_dir(dst.parent)
            if src.parent != dst.parent:
                _fsync_dir(src.parent)


def _marker_last_train(path: Path) -> int:
    """The train id a ``stored/`` marker holds; 0 when empty (older versions) or unreadable."""
    try:
        text = path.read_text(encoding="ascii").strip()
        if not text:
            return 0
        value = json.loads(text)["last_train"]
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log.warning("ignoring stored/ marker %s: no train id in it", path)
    return 0


def _file_last_train(path: Path) -> int:
    """The highest train id in a file's INDEX; 0 if it has none or cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            ids = f["INDEX/trainId"][:]
    except (OSError, KeyError, ValueError, TypeError) as exc:
        log.debug("no train ids from %s: %s", path, exc)
        return 0
    ids = np.asarray(ids).ravel()
    return int(ids.max()) if ids.size else 0


def _check_name(name: str) -> None:
    if (
        not name
        or name != os.path.basename(name)
        or name in (".", "..")
        or name.startswith(".")
        or "\0" in name
        or "\\" in name
    ):
        raise StoreError(f"not a plain file name for the spool: {name!r}")


def _free_name(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``... whichever does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot sync {path}: {exc.strerror}") from exc


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot sync directory {path}: {exc.strerror}") from exc


class SpoolLimit:
    """Keeps a spool below its size limit while the destination does not take files.

    :meth:`wait` is called before each train is written. Over the limit, the ``block`` policy
    waits until stored files leave the spool (the input then backs up to the sender; ZeroMQ's
    high-water mark pushes back), ``stop`` ends the run; either is logged as an error, again
    every ``log_every`` seconds while it lasts.

    Parameters
    ----------
    spool, limit
        The spool and its limit in bytes (None: no limit, :meth:`wait` returns at once).
    policy
        ``"block"`` or ``"stop"``.
    """

    POLICIES = ("block", "stop")

    def __init__(
        self, spool: Spool, limit: int | None, policy: str = "block", *, log_every: float = 10.0
    ) -> None:
        if policy not in self.POLICIES:
            raise ConfigError(
                f"overflow must be one of {', '.join(self.POLICIES)}. Got {policy!r} instead.",
                key="output.overflow",
            )
        self.spool, self.limit, self.policy = spool, limit, policy
        self.log_every = log_every
        self.blocked_s = 0.0
        self.stopped = False
        self._usage = (0.0, 0)  # (when, bytes) last seen, for the log lines

    def full(self) -> bool:
        """Whether the spool is at or above its limit (a few directory entries to look at)."""
        if self.limit is None:
            return False
        used = self.spool.usage()
        self._usage = (time.monotonic(), used)
        return used >= self.limit

    def wait(self, stop: threading.Event) -> bool:
        """Return once there is room (True), or False when the run must stop.

        ``stop`` being set (the pipeline is shutting down) ends the wait as well: the trains
        still queued are written, overshooting the limit by at most the queues' content.
        """
        if not self.full():
            return True
        what = self.spool.root
        if self.policy == "stop":
            if self.stopped:
                return False
            self.stopped = True
            log.error(
                "spool %s is full (%.2f GB of %.2f GB, output.spool_limit): the destination is "
                "not taking files; stopping the run (output.overflow = stop)",
                what, self._usage[1] / 1e9, self.limit / 1e9,
            )
            return False
        t0 = next_log = time.monotonic()
        while self.full() and not stop.is_set():
            if time.monotonic() >= next_log:
                log.error(
                    "spool %s is full (%.2f GB of %.2f GB, output.spool_limit): the destination "
                    "is not taking files; input blocked for %.0f s (output.overflow = block)",
                    what, self._usage[1] / 1e9, self.limit / 1e9, time.monotonic() - t0,
                )
                next_log = time.monotonic() + self.log_every
            stop.wait(0.2)
        self.blocked_s += time.monotonic() - t0
        if not stop.is_set():
            log.warning("spool %s has room again after %.1f s; input resumes",
                        what, time.monotonic() - t0)
        return True
