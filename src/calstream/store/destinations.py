"""Destinations: where complete files go (a dCache NFS mount, or its WebDAV door).

A destination makes a spool file visible under ``root/relpath`` only once it is complete and
durable, and reports its Adler-32 (computed while the data passes, never in a separate pass).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Protocol, runtime_checkable

from calstream.errors import ConfigError, StoreError
from calstream.store.checksum import BLOCKSIZE, Adler32, adler32_file
from calstream.store.records import StoredFile
from calstream.store.webdav import PART_RE, WebdavDestination, WebdavSettings

__all__ = ["Destination", "FileDestination", "check_destination_url", "open_destination"]

log = logging.getLogger(__name__)

# link() failing with these means "this filesystem cannot": fall back to copying
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


@runtime_checkable
class Destination(Protocol):
    """Something that stores complete spool files: ``store(path, relpath) -> StoredFile``."""

    url: str

    def store(self, path: Path, relpath: str) -> StoredFile: ...


def open_destination(url: str, webdav: WebdavSettings | None = None) -> Destination:
    """The destination for a URL from the configuration.

    ``file:///abs/path`` or ``file://./relative`` (resolved against the current directory);
    ``davs://door:2880/path`` or ``https://…`` (a dCache WebDAV door, with ``webdav``'s token
    and TLS settings); ``dav://`` or ``http://`` to a loopback host only (tests).

    Raises
    ------
    ConfigError
        Any other scheme, or no scheme at all.
    """
    scheme, rest = check_destination_url(url)
    if scheme == "file":
        return FileDestination(Path(rest).absolute())
    return WebdavDestination(url, webdav)


def check_destination_url(url: str) -> tuple[str, str]:
    """Split a destination URL into its scheme and the rest, or say what is wrong with it.

    Touches nothing (``calstream check`` uses it); ``file://localhost/x`` gives ``/x``.

    Raises
    ------
    ConfigError
        ``output.destination``: no scheme, an unknown scheme, or a ``file://`` without path.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(
            f"destination {url!r} has no scheme; use e.g. 'file:///data/proc'",
            key="output.destination",
        )
    scheme = scheme.lower()
    if scheme == "file":
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest:
            raise ConfigError(f"destination {url!r} has no path", key="output.destination")
        return scheme, rest
    if scheme in ("davs", "dav", "https", "http"):
        return scheme, rest
    raise ConfigError(
        f"unknown destination scheme {scheme!r}; supported: file://, davs://, https://",
        key="output.destination",
    )


class FileDestination:
    """Store files below ``root`` on a POSIX filesystem (e.g. a dCache NFS mount).

    A file is copied to a hidden temporary name ``.{name}.part-{random}`` in the target
    directory while its Adler-32 is computed from the same reads, flushed (``fsync``), renamed
    into place atomically and the directory flushed. When the spool file and the target
    directory are on the same filesystem (equal ``st_dev``) the file is hard-linked into place
    instead of copied, after one read pass that computes its Adler-32: no data is written
    twice, the name appears atomically and cannot overwrite an existing file, and the spool
    keeps its own name until the caller removes it (so a crash between storing and announcing
    the file repeats the store, which then finds the identical file). Filesystems without hard
    links fall back to copying.

    Storing a file identical (same size and Adler-32) to one already there returns the
    existing one; a different file under the same name is a :class:`StoreError`.

    Parameters
    ----------
    root
        Destination root, created if missing.
    link
        Allow hard links on the same filesystem (``False``: always copy).
    fsync
        Flush data and directories before reporting success.
    """

    protocol = "file"

    def __init__(
        self, root: str | os.PathLike[str], *, link: bool = True, fsync: bool = True
    ) -> None:
        self.root = Path(root).absolute()
        self.link = link
        self.fsync = fsync
        self.host = socket.gethostname()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create destination {self.root}: {exc.strerror}") from exc

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def __repr__(self) -> str:
        return f"FileDestination({str(self.root)!r})"

    def target(self, relpath: str) -> Path:
        """The path ``relpath`` maps to; StoreError if it would leave the root."""
        rel = PurePosixPath(relpath) if isinstance(relpath, str) else None
        if (
            rel is None
            or not relpath
            or "\0" in relpath
            or "\\" in relpath
            or rel.is_absolute()
            or any(part in ("", ".", "..") for part in relpath.split("/"))
            or rel.name.startswith(".")
        ):
            raise StoreError(f"relative path {relpath!r} is not allowed below {self.root}")
        return self.root.joinpath(*rel.parts)

    def has_copy(self, relpath: str, size: int, adler32: str) -> bool:
        """Whether ``root/relpath`` is a regular file with this size and Adler-32."""
        path = self.target(relpath)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot look at {path}: {exc.strerror}") from exc
        return (stat.S_ISREG(st.st_mode) and st.st_size == size
                and adler32_file(path) == adler32.lower())

    def remove(self, relpath: str) -> None:
        """Delete ``root/relpath`` (a missing file is fine)."""
        path = self.target(relpath)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot delete %s: %s", path, exc.strerror)

    def remove_stale_parts(self, directory: str, owned: Callable[[str], bool]) -> list[str]:
        """Delete hidden ``.NAME.part-XXXXXXXX`` copies in ``directory`` whose NAME is ``owned``.

        Returns the names removed; a missing directory has none.
        """
        folder = self.root / directory.strip("/") if directory.strip("/") else self.root
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot list {folder}: {exc.strerror}") from exc
        removed = []
        for entry in entries:
            m = PART_RE.fullmatch(entry.name)
            if m is None or not owned(m["name"]) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot delete stale copy %s: %s", entry.path, exc.strerror)
                continue
            removed.append(entry.name)
        return removed

    def store(self, path: Path, relpath: str) -> StoredFile:
        """Make ``path`` available as ``root/relpath``; returns where it is and its checksum.

        Raises
        ------
        StoreError
            A relpath leaving the root (``..``, absolute, through a symlink), a different
            file already stored under that name, or any OSError (the message names the path).
        """
        t0 = time.monotonic()
        path = Path(path)
        target = self.target(relpath)
        try:
            self._make_parents(target)
            src = os.stat(path)
            if not stat.S_ISREG(src.st_mode):
                raise StoreError(f"{path} is not a regular file")
            if os.path.lexists(target):
                return self._existing(path, target, t0)
            if self.link and src.st_dev == os.stat(target.parent).st_dev:
                stored = self._link(path, target, t0)
                if stored is not None:
                    return stored
            return self._copy(path, target, t0)
        except StoreError:
            raise
        except OSError as exc:
            where = exc.filename or target
            raise StoreError(f"storing {path} as {target} failed: {where}: {exc.strerror}") from exc

    # --- steps ------------------------------------------------------------------------

    def _make_parents(self, target: Path) -> None:
        """Create the directories below the root, refusing any symlink on the way."""
        current = self.root
        for part in target.relative_to(self.root).parts[:-1]:
            current = current / part
            with contextlib.suppress(FileExistsError):
                os.mkdir(current)
            st = os.lstat(current)
            if not stat.S_ISDIR(st.st_mode):
                kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise StoreError(f"{current} is {kind}: refusing to store below it")

    def _existing(self, path: Path, target: Path, t0: float) -> StoredFile:
        st = os.lstat(target)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{target} exists and is not a regular file")
        if os.path.samefile(path, target):
            return self._result(target, st.st_size, adler32_file(target), t0)
        size = os.stat(path).st_size
        if st.st_size == size:
            ours = adler32_file(path)
            theirs = adler32_file(target)
            if ours == theirs:
                log.info("%s is already stored (same size and adler32 %s)", target, ours)
                return self._result(target, size, ours, t0)
            detail = f"adler32 {theirs} there, {ours} here"
        else:
            detail = f"{st.st_size} bytes there, {size} here"
        raise StoreError(f"a different file is already stored as {target} ({detail})")

    def _link(self, path: Path, target: Path, t0: float) -> StoredFile | None:
        checksum = Adler32()
        buf = bytearray(BLOCKSIZE)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                checksum.update(view[:n])
            if self.fsync:
                os.fsync(f.fileno())
        try:
            os.link(path, target)
        except FileExistsError:
            return self._existing(path, target, t0)
        except OSError as exc:
            if exc.errno in _NO_LINK:
                log.debug("cannot hard-link into %s (%s): copying", target.parent, exc.strerror)
                return None
            raise
        self._sync_dir(target.parent)
        return self._result(target, checksum.nbytes, checksum.hexdigest(), t0)

    def _copy(self, path: Path, target: Path, t0: float) -> StoredFile:
        tmp = target.with_name(f".{target.name}.part-{secrets.token_hex(4)}")
        checksum = Adler32()
        buf = bytearray(BLOCKSIZE)
        view = memoryview(buf)
        try:
            with open(path, "rb", buffering=0) as fin:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                try:
                    while n := fin.readinto(buf):
                        checksum.update(view[:n])
                        _write_all(fd, view[:n])
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            if os.path.lexists(target):  # appeared while we copied
                return self._existing(path, target, t0)
            os.replace(tmp, target)
        finally:
            if os.path.lexists(tmp):
                tmp.unlink()
        self._sync_dir(target.parent)
        return self._result(target, checksum.nbytes, checksum.hexdigest(), t0)

    def _sync_dir(self, directory: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _result(self, target: Path, size: int, adler32: str, t0: float) -> StoredFile:
        return StoredFile(
            url=f"file://{target}",
            path=str(target),
            size=size,
            adler32=adler32,
            transfer_time_s=time.monotonic() - t0,
            protocol=self.protocol,
            host=self.host,
        )


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]
