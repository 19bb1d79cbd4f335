"""WebDAV destination: a dCache WebDAV door (``davs://``, ``https://``), or any WebDAV server.

One file is one ``PUT`` streamed from the spool file (block by block, never the whole file in
memory) while its Adler-32 is computed from the same reads, to a hidden temporary name that a
``MOVE`` (``Overwrite: F``) then gives its real name, so a broken upload is never visible under
the real name (``WebdavSettings.rename``; off: the PUT goes to the real name). The PUT carries
``Authorization: Bearer <token>`` (read from a file, re-read when the file changes, never
logged), ``Want-Digest: adler32`` and ``If-None-Match: *`` (never overwrite). dCache answers
``Digest: adler32=<8 hex>``: it must equal ours, or the upload counts as failed, the remote copy
is deleted and the upload retried. What counts::

    201, 204                 stored (after the digest check; without a digest: HEAD checks it)
    409, 412 (PUT or MOVE)   something is there already: HEAD (Want-Digest) compares size and
                             checksum; an identical file counts as stored, a different one is
                             an error that retrying cannot fix. 409 with nothing there means a
                             missing parent: collections are created (MKCOL) and PUT again.
    401, 403, other 4xx      refused: not retried
    5xx, connection errors   retried with exponential backoff and jitter until the deadline

The whole ``store`` call, retries included, is bounded by ``WebdavSettings.deadline``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit, urlunsplit
from xml.etree import ElementTree

import httpx

from calstream.errors import ChecksumMismatch, ConfigError, StoreError
from calstream.store.checksum import BLOCKSIZE, Adler32
from calstream.store.records import StoredFile

__all__ = ["WebdavDestination", "WebdavSettings"]

log = logging.getLogger(__name__)

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_DEADLINE = "the deadline passed"
#: Blocks of the streamed PUT body (also what is read from the spool file at a time).
UPLOAD_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class WebdavSettings:
    """How to talk to a WebDAV door.

    Parameters
    ----------
    token_file
        File holding the bearer token (a macaroon or an OIDC access token); empty: no
        ``Authorization`` header. Re-read whenever its modification time or size changes.
    ca_bundle
        PEM file or directory of CA certificates to verify the door with; empty: the system's.
    verify_tls
        Verify the door's TLS certificate (turn off only for a test door).
    timeout
        Seconds one request may wait to connect or for the next bytes.
    deadline
        Seconds one file may take, all retries included, before it is given up (it stays in
        the spool for the next start).
    backoff, backoff_max
        First and longest wait between attempts; each wait doubles, with ±50 % jitter.
    rename
        PUT to a hidden temporary name (``.name.part-XXXXXXXX``) and ``MOVE`` it into place
        (``Overwrite: F``), so that no broken upload is ever visible under the real name;
        ``False``: PUT to the real name (one request less, for doors that remove failed
        uploads themselves, as dCache does).
    """

    token_file: str = ""
    ca_bundle: str = ""
    verify_tls: bool = True
    timeout: float = 60.0
    deadline: float = 600.0
    backoff: float = 1.0
    backoff_max: float = 60.0
    rename: bool = True


class _Retry(Exception):
    """An attempt to repeat at once (without waiting), e.g. after creating collections."""


class _Token:
    """A bearer token file, re-read when it changes. The token itself is never logged."""

    def __init__(self, path: str) -> None:
        self.path = Path(path) if path else None
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""
        self._lock = threading.Lock()

    def header(self) -> dict[str, str]:
        if self.path is None:
            return {}
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    token = self.path.read_text(encoding="utf-8").strip()
                    if not token:
                        raise StoreError(f"token file {self.path} is empty")
                    if any(c.isspace() for c in token):
                        raise StoreError(f"token file {self.path} holds more than one word")
                    self._token, self._stamp = token, stamp
                    log.debug("read the bearer token from %s", self.path)
            except OSError as exc:
                # retriable: a token renewer may be about to write it
                raise StoreError(f"cannot read token file {self.path}: {exc.strerror}") from exc
            return {"Authorization": f"Bearer {self._token}"}


class WebdavDestination:
    """Store files below a WebDAV collection URL (a dCache WebDAV door).

    Parameters
    ----------
    url
        ``davs://host:port/path`` or ``https://…``; ``dav://`` and ``http://`` only to a
        loopback host (the token would travel in clear).
    settings
        Token, TLS, timeouts and retries.
    """

    protocol = "https"

    def __init__(self, url: str, settings: WebdavSettings | None = None) -> None:
        self.settings = settings or WebdavSettings()
        parts = urlsplit(url)
        scheme = {"davs": "https", "https": "https", "dav": "http", "http": "http"}.get(
            parts.scheme.lower()
        )
        if scheme is None or not parts.hostname:
            raise ConfigError(
                f"destination {url!r} is not a WebDAV URL like 'davs://door:2880/pnfs/...'",
                key="output.destination",
            )
        if scheme == "http" and parts.hostname not in _LOOPBACK:
            raise ConfigError(
                f"destination {url!r}: plain http is only allowed to a loopback host (the "
                "token would travel in clear); use davs:// or https://",
                key="output.destination",
            )
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigError(
                f"destination {url!r} must not carry credentials, a query or a fragment "
                "(put the token in output.token_file)",
                key="output.destination",
            )
        s = self.settings
        if s.deadline <= 0 or s.timeout <= 0:
            raise ConfigError("timeout and deadline must be > 0", key="output.store_deadline")
        if s.ca_bundle and not os.path.exists(s.ca_bundle):
            raise ConfigError(f"CA bundle {s.ca_bundle!r} not found", key="output.ca_bundle")
        if s.token_file and not os.path.isfile(s.token_file):
            # at start-up a clear error; later a missing token is retried (a renewer may be
            # rewriting it)
            raise ConfigError(f"token file {s.token_file!r} not found", key="output.token_file")
        self.protocol = scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if scheme == "https" else 80)
        self.base_path = "/" + parts.path.strip("/") if parts.path.strip("/") else ""
        self.base = urlunsplit((scheme, parts.netloc, self.base_path, "", ""))
        self.client_host = socket.gethostname()
        if scheme == "https" and not s.verify_tls:
            log.warning("TLS certificates of %s are not verified (output.verify_tls = false)",
                        self.base)
        self._token = _Token(s.token_file)
        self._local = threading.local()  # one httpx.Client per storer thread
        self._clients: list[httpx.Client] = []
        self._collections: set[str] = set()
        self._lock = threading.Lock()
        self._mkcol_lock = threading.Lock()
        httpx_log = logging.getLogger("httpx")
        if httpx_log.level == logging.NOTSET:
            # one INFO line per request would repeat what the storer logs once per file
            httpx_log.setLevel(logging.WARNING)

    @property
    def url(self) -> str:
        return self.base

    def __repr__(self) -> str:
        return f"WebdavDestination({self.base!r})"

    def close(self) -> None:
        """Close the HTTP connections (safe to call twice)."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    # --- public -------------------------------------------------------------------------

    def target(self, relpath: str) -> str:
        """The URL ``relpath`` maps to; StoreError for anything that could leave the root."""
        rel = PurePosixPath(relpath) if isinstance(relpath, str) else None
        if (
            rel is None
            or not relpath
            or any(c in relpath for c in "\0\\?#%")
            or rel.is_absolute()
            or any(part in ("", ".", "..") for part in relpath.split("/"))
            or rel.name.startswith(".")
        ):
            raise StoreError(f"relative path {relpath!r} is not allowed below {self.base}")
        return f"{self.base}/{quote(relpath)}"

    def has_copy(self, relpath: str, size: int, adler32: str) -> bool:
        """Whether ``relpath`` is there with this size and Adler-32 (``HEAD``, ``Want-Digest``).

        A door without digests has the file read back, but only when the size matches.
        """
        url = self.target(relpath)
        deadline = time.monotonic() + self.settings.deadline
        response = self._request("HEAD", url, deadline, headers=self._head_headers())
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise _http_error("HEAD", url, response, self.settings.token_file)
        if _content_length(response) != size:
            return False
        theirs = _adler32_of(response) or self._download_adler32(url, deadline)
        return theirs == adler32.lower()

    def remove(self, relpath: str) -> None:
        """Delete ``relpath`` at the door (best effort, logged; a missing file is fine)."""
        url = self.target(relpath)
        self._delete(url, time.monotonic() + self.settings.timeout, missing_ok=True)

    def download(self, url: str, out: BinaryIO) -> tuple[int, str, str | None]:
        """``GET`` a file below this URL into ``out``, block by block (never all in memory).

        Returns (bytes, Adler-32 of what arrived, the Adler-32 the door reports or None).

        Raises
        ------
        StoreError
            The door refused it (401/403 and 404 not retriable), or the transfer broke.
        """
        if not url.startswith(self.base + "/"):
            raise StoreError(f"{url} is not below {self.base}", retriable=False)
        checksum = Adler32()
        deadline = time.monotonic() + self.settings.deadline
        try:
            with self._client().stream(
                "GET", url, headers=self._head_headers(), timeout=self._timeout(deadline)
            ) as response:
                if response.status_code != 200:
                    response.read()
                    err = _http_error("GET", url, response, self.settings.token_file)
                    if response.status_code == 404:
                        err.retriable = False
                    raise err
                theirs = _adler32_of(response)
                for block in response.iter_bytes(UPLOAD_BLOCK):
                    checksum.update(block)
                    out.write(block)
                    if time.monotonic() > deadline:
                        raise StoreError(f"GET {url}: {_DEADLINE}")
        except httpx.HTTPError as exc:
            raise _transport_error("GET", url, exc) from exc
        return checksum.nbytes, checksum.hexdigest(), theirs

    def remove_stale_parts(self, directory: str, owned: Callable[[str], bool]) -> list[str]:
        """Delete hidden ``.NAME.part-XXXXXXXX`` uploads in ``directory`` whose NAME is ``owned``.

        Returns the names removed. A missing directory has none; a listing the door refuses
        is a StoreError.
        """
        col = f"{self.base}/{quote(directory.strip('/'))}/" if directory.strip("/") else (
            f"{self.base}/")
        deadline = time.monotonic() + self.settings.timeout
        response = self._request(
            "PROPFIND", col, deadline,
            headers={**self._token.header(), "Depth": "1",
                     "Content-Type": "application/xml; charset=utf-8"},
            content=_PROPFIND,
        )
        if response.status_code == 404:
            return []
        if response.status_code != 207:
            raise _http_error("PROPFIND", col, response, self.settings.token_file)
        removed = []
        for name in _propfind_names(response.content):
            m = PART_RE.fullmatch(name)
            if m is None or not owned(m["name"]):
                continue
            response = self._request(
                "DELETE", col + quote(name), deadline, headers=self._token.header()
            )
            if response.status_code in (200, 204, 404):
                removed.append(name)
            else:
                log.warning("cannot delete stale upload %s%s: HTTP %d", col, name,
                            response.status_code)
        return removed

    def store(self, path: Path, relpath: str) -> StoredFile:
        """Upload ``path`` as ``relpath``; returns the stored file with its verified Adler-32.

        Raises
        ------
        StoreError
            The door refused it (not retried), a different file is there already, or the
            deadline passed while retrying (the message names the URL and the last error).
        """
        t0 = time.monotonic()
        path = Path(path)
        url = self.target(relpath)
        s = self.settings
        deadline = t0 + s.deadline
        attempt = 0
        wait = s.backoff
        last: StoreError | None = None
        again = False
        while True:
            attempt += 1
            try:
                try:
                    adler32, size = self._attempt(path, url, deadline)
                except _Retry as retry:
                    if not again:  # at once, once; a second time waits like any failure
                        again = True
                        continue
                    raise StoreError(str(retry)) from None
            except StoreError as exc:
                if not exc.retriable:
                    raise
                if exc.message != _DEADLINE or last is None:
                    last = exc
                left = deadline - time.monotonic()
                pause = wait * random.uniform(0.5, 1.5)
                if pause >= left:  # the next attempt would start after the deadline
                    raise StoreError(
                        f"gave up uploading {path.name} to {url} after {attempt} attempts in "
                        f"{time.monotonic() - t0:.1f} s (output.store_deadline = "
                        f"{s.deadline:g} s): {last.message}"
                    ) from exc
                log.warning(
                    "upload of %s to %s failed (attempt %d): %s; retrying in %.1f s",
                    path.name, url, attempt, exc.message, pause,
                )
                time.sleep(pause)
                wait = min(wait * 2, s.backoff_max)
                continue
            return StoredFile(
                url=url,
                path=urlsplit(url).path,
                size=size,
                adler32=adler32,
                transfer_time_s=time.monotonic() - t0,
                protocol=self.protocol,
                host=self.host,
                port=self.port,
            )

    # --- one attempt ----------------------------------------------------------------------

    def _attempt(self, path: Path, url: str, deadline: float) -> tuple[str, int]:
        """Store once; returns (adler32, size) when the file is stored, else raises."""
        self._make_collections(url, deadline)
        if not self.settings.rename:
            return self._put(path, url, deadline)
        # A hidden name first: a broken upload (door, network or us killed) is never visible
        # under the real name, whatever the server does with it.
        parent, name = url.rsplit("/", 1)
        temp = f"{parent}/.{name}.part-{secrets.token_hex(4)}"
        try:
            adler32, size = self._put(path, temp, deadline)
        except StoreError as exc:
            # a PUT that broke off may have left part of the file under the hidden name (a
            # wrong digest already deleted it; nothing was sent if we could not connect)
            if not isinstance(exc, ChecksumMismatch) and not getattr(exc, "unsent", False):
                self._delete(temp, deadline, missing_ok=True)
            raise
        moved = False
        try:
            response = self._request(
                "MOVE", temp, deadline,
                headers={**self._token.header(), "Destination": url, "Overwrite": "F"},
            )
            if response.status_code in (201, 204):
                moved = True
                return adler32, size
            if response.status_code in (409, 412):
                return self._existing(path, url, size, deadline)
            raise _http_error("MOVE", temp, response, self.settings.token_file)
        finally:
            if not moved:
                self._delete(temp, deadline, missing_ok=True)

    def _put(self, path: Path, url: str, deadline: float) -> tuple[str, int]:
        """PUT once; returns (adler32, size) when the file is there, else raises.

        A copy that arrived broken (wrong size or checksum) is deleted before raising.
        """
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115  (closed by the with below)
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}", retriable=False) from exc
        with f:
            size = os.fstat(f.fileno()).st_size
            checksum = Adler32()
            headers = {
                **self._token.header(),
                "Want-Digest": "adler32",
                "If-None-Match": "*",
                "Content-Length": str(size),
                "Content-Type": "application/octet-stream",
            }
            response = self._request(
                "PUT", url, deadline, headers=headers, content=_blocks(f, checksum)
            )
        status = response.status_code
        if status in (201, 204) or status == 200:
            if checksum.nbytes != size:
                raise StoreError(f"{path} changed size while it was uploaded to {url}")
            ours = checksum.hexdigest()
            theirs = _adler32_of(response)
            if theirs is None:
                theirs, their_size = self._remote(url, deadline)
                if their_size is not None and their_size != size:
                    self._delete(url, deadline)
                    raise StoreError(
                        f"{url} holds {their_size} bytes after the upload, we sent {size}"
                    )
            if theirs is not None and theirs != ours:
                self._delete(url, deadline)
                raise ChecksumMismatch(
                    f"{url} reports adler32 {theirs} after the upload, ours is {ours}; the "
                    "upload counts as failed"
                )
            if theirs is None:
                log.debug("%s reports no checksum; the size matches", url)
            return ours, size
        if status in (409, 412):
            return self._existing(path, url, size, deadline)
        raise _http_error("PUT", url, response, self.settings.token_file)

    def _existing(self, path: Path, url: str, size: int, deadline: float) -> tuple[str, int]:
        """The PUT found something in the way: an identical file counts as stored."""
        response = self._request("HEAD", url, deadline, headers=self._head_headers())
        if response.status_code == 404:
            with self._lock:
                self._collections.clear()  # a parent is missing after all
            raise _Retry(f"{url}: HTTP 409 Conflict, and nothing is there (missing collection?)")
        if response.status_code != 200:
            raise _http_error("HEAD", url, response, self.settings.token_file)
        their_size = _content_length(response)
        ours = _adler32_path(path)
        if their_size == size:
            theirs = _adler32_of(response) or self._download_adler32(url, deadline)
            if theirs == ours:
                log.info("%s is already stored (same size and adler32 %s)", url, ours)
                return ours, size
            detail = f"adler32 {theirs} there, {ours} here"
        else:
            detail = f"{their_size} bytes there, {size} here"
        raise StoreError(
            f"a different file is already stored as {url} ({detail})", retriable=False
        )

    def _remote(self, url: str, deadline: float) -> tuple[str | None, int | None]:
        response = self._request("HEAD", url, deadline, headers=self._head_headers())
        if response.status_code != 200:
            raise _http_error("HEAD", url, response, self.settings.token_file)
        return _adler32_of(response), _content_length(response)

    def _download_adler32(self, url: str, deadline: float) -> str:
        """Adler-32 of a remote file read back (for servers that report no checksum)."""
        checksum = Adler32()
        client = self._client()
        try:
            with client.stream(
                "GET", url, headers=self._token.header(), timeout=self._timeout(deadline)
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise _http_error("GET", url, response, self.settings.token_file)
                for block in response.iter_bytes(UPLOAD_BLOCK):
                    checksum.update(block)
        except httpx.HTTPError as exc:
            raise _transport_error("GET", url, exc) from exc
        return checksum.hexdigest()

    def _delete(self, url: str, deadline: float, *, missing_ok: bool = False) -> None:
        """Remove a bad or surplus upload (best effort: a retry's HEAD sees what is left)."""
        try:
            response = self._request(
                "DELETE", url, max(deadline, time.monotonic() + 5.0),
                headers=self._token.header(),
            )
        except StoreError as exc:
            log.warning("cannot delete %s: %s", url, exc.message)
            return
        if response.status_code == 404 and missing_ok:
            return
        if response.status_code not in (200, 204, 404):
            log.warning("cannot delete %s: HTTP %d", url, response.status_code)

    def _make_collections(self, url: str, deadline: float) -> None:
        """Make sure the collection ``url`` goes into exists (MKCOL, parents as needed)."""
        self._collection(urlsplit(url).path.rsplit("/", 1)[0], deadline)

    def _collection(self, path: str, deadline: float) -> None:
        """MKCOL ``path``; on 409 (its parent is missing) the parent first, then again.

        Known collections are remembered, so the usual case costs nothing, and a new run
        directory one request; the destination root itself is created too if it is missing.
        """
        # One MKCOL at a time: storers creating the same new run directory at once would
        # race (a server may answer the loser with 500 instead of 405).
        with self._mkcol_lock:
            self._create_collection(path, deadline)

    def _create_collection(self, path: str, deadline: float) -> None:
        with self._lock:
            if not path.strip("/") or path in self._collections:
                return
        base = urlsplit(self.base)
        col = urlunsplit((base.scheme, base.netloc, path + "/", "", ""))
        for first in (True, False):
            response = self._request("MKCOL", col, deadline, headers=self._token.header())
            # 201 created, 405 already there (RFC 4918); some servers answer 301 for a
            # collection addressed without its slash
            if response.status_code in (200, 201, 204, 301, 405):
                with self._lock:
                    self._collections.add(path)
                if response.status_code == 201:
                    log.info("created collection %s", col)
                return
            if response.status_code == 409 and first:  # the parent is missing
                self._create_collection(path.rsplit("/", 1)[0], deadline)
                continue
            break
        raise _http_error("MKCOL", col, response, self.settings.token_file)

    # --- HTTP -----------------------------------------------------------------------------

    def _head_headers(self) -> dict[str, str]:
        return {**self._token.header(), "Want-Digest": "adler32"}

    def _client(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            s = self.settings
            verify: Any = s.verify_tls
            if s.verify_tls and s.ca_bundle:
                ca = Path(s.ca_bundle)
                verify = ssl.create_default_context(
                    cafile=str(ca) if ca.is_file() else None,
                    capath=str(ca) if ca.is_dir() else None,
                )
            client = httpx.Client(verify=verify, follow_redirects=False, trust_env=False)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _timeout(self, deadline: float) -> httpx.Timeout:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StoreError(_DEADLINE)
        return httpx.Timeout(min(self.settings.timeout, left))

    def _request(self, method: str, url: str, deadline: float, **kwargs: Any) -> httpx.Response:
        try:
            return self._client().request(method, url, timeout=self._timeout(deadline), **kwargs)
        except httpx.HTTPError as exc:
            raise _transport_error(method, url, exc) from exc


def _blocks(f: Any, checksum: Adler32) -> Iterator[bytes]:
    """The file's blocks for the request body, each added to ``checksum`` as it passes."""
    while block := f.read(UPLOAD_BLOCK):
        checksum.update(block)
        yield block


def _adler32_path(path: Path) -> str:
    from calstream.store.checksum import adler32_file

    return adler32_file(path, BLOCKSIZE)


def _adler32_of(response: httpx.Response) -> str | None:
    """The adler32 in a ``Digest`` header (RFC 3230: ``adler32=0a1b2c3d,md5=…``), or None."""
    for value in response.headers.get_list("digest"):
        for item in value.split(","):
            algo, sep, digest = item.strip().partition("=")
            if sep and algo.strip().lower() == "adler32":
                return digest.strip().lower().zfill(8)
    return None


def _content_length(response: httpx.Response) -> int | None:
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


def _http_error(method: str, url: str, response: httpx.Response, token_file: str) -> StoreError:
    status = response.status_code
    text = f"{method} {url}: HTTP {status} {response.reason_phrase}".rstrip()
    if status in (401, 403):
        hint = f" (check the token in {token_file})" if token_file else " (no token_file set)"
        return StoreError(f"{text}: refused{hint}", retriable=False)
    # 5xx: the door or a pool is in trouble; 408/425/429: come back later
    retriable = status >= 500 or status in (408, 425, 429)
    return StoreError(text, retriable=retriable)


def _transport_error(method: str, url: str, exc: httpx.HTTPError) -> StoreError:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    detail = str(exc) or type(exc).__name__
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            # retrying will not make the certificate trusted
            return StoreError(
                f"{method} {url}: the door's TLS certificate is not trusted "
                f"({cause.verify_message or cause}); set output.ca_bundle to the CA that "
                "signed it",
                retriable=False,
            )
        cause = cause.__cause__ or cause.__context__
    err = StoreError(f"{method} {url} {kind}: {detail}")
    err.unsent = isinstance(exc, httpx.ConnectError)  # type: ignore[attr-defined]
    return err


_PROPFIND = (b'<?xml version="1.0" encoding="utf-8"?>'
             b'<propfind xmlns="DAV:"><prop><resourcetype/></prop></propfind>')
#: The hidden temporary name of an upload (``WebdavSettings.rename``, FileDestination's copy).
PART_RE = re.compile(r"\.(?P<name>.+)\.part-[0-9a-f]{8}")


def _propfind_names(body: bytes) -> list[str]:
    """The member names (last path segment) in a PROPFIND multistatus answer."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise StoreError(f"PROPFIND answer is not XML: {exc}") from exc
    names = []
    for href in root.iter("{DAV:}href"):
        name = unquote(urlsplit((href.text or "").strip()).path.rstrip("/").rsplit("/", 1)[-1])
        if name:
            names.append(name)
    return names
