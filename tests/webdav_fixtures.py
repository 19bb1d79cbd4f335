"""A real WebDAV server (wsgidav on cheroot, loopback) that behaves like a dCache door.

The middleware in front of wsgidav adds what dCache does and wsgidav does not: a bearer-token
check and the ``Digest: adler32=…`` response header (RFC 3230) on PUT, HEAD and GET. Tests
inject faults through :class:`Faults`: status codes for the next requests of a method, a
wrong digest, a slow answer.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from tests.ports import free_port

TOKEN = "test-macaroon-3f9a"  # what the server accepts; tests check it never shows in logs
PREFIX = "/pnfs"


@dataclass
class Faults:
    """What the server does wrong next; each list is consumed one request at a time."""

    status: dict[str, list[int]] = field(default_factory=dict)  # method -> statuses to answer
    wrong_digest: int = 0  # PUT answers with a wrong adler32
    delay: float = 0.0  # seconds before answering a PUT
    no_digest: bool = False  # behave like a server without RFC 3230 digests
    requests: Counter[str] = field(default_factory=Counter)  # method -> requests seen
    authorization: list[str] = field(default_factory=list)  # Authorization headers seen

    def fail(self, method: str, *statuses: int) -> None:
        self.status.setdefault(method, []).extend(statuses)


class DcacheMiddleware:
    """Bearer token, adler32 Digest header and fault injection in front of wsgidav."""

    def __init__(self, app: Callable[..., Any], root: Path, faults: Faults) -> None:
        self.app, self.root, self.faults = app, root, faults

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method = environ["REQUEST_METHOD"]
        faults = self.faults
        faults.requests[method] += 1
        auth = environ.get("HTTP_AUTHORIZATION", "")
        faults.authorization.append(auth)
        if auth != f"Bearer {TOKEN}":
            return _answer(start_response, "401 Unauthorized")
        if method == "PUT" and faults.delay:
            time.sleep(faults.delay)
        queued = faults.status.get(method)
        if queued:
            code = queued.pop(0)
            _drain(environ)
            return _answer(start_response, f"{code} Injected")
        wrong = method == "PUT" and faults.wrong_digest > 0
        if wrong:
            faults.wrong_digest -= 1
        want = "adler32" in environ.get("HTTP_WANT_DIGEST", "").lower() and not faults.no_digest
        path = unquote(environ.get("PATH_INFO", ""))

        def respond(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            code = int(status.split()[0])
            if want and code in (200, 201, 204) and method in ("PUT", "HEAD", "GET"):
                digest = self._adler32(path)
                if digest is not None:
                    if wrong:
                        digest = f"{(int(digest, 16) + 1) & 0xFFFFFFFF:08x}"
                    headers = [*headers, ("Digest", f"adler32={digest}")]
            return start_response(status, headers, exc_info)

        return self.app(environ, respond)

    def _adler32(self, path: str) -> str | None:
        if not path.startswith(PREFIX + "/"):
            return None
        local = self.root / path[len(PREFIX) + 1 :]
        if not local.is_file():
            return None
        value = 1
        with open(local, "rb") as f:
            while block := f.read(1 << 20):
                value = zlib.adler32(block, value)
        return f"{value:08x}"


def _drain(environ: dict[str, Any]) -> None:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    stream = environ["wsgi.input"]
    while length > 0:
        block = stream.read(min(length, 1 << 20))
        if not block:
            break
        length -= len(block)


def _answer(start_response: Callable[..., Any], status: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", "0")])
    return [b""]



class WebdavServer:
    """wsgidav serving ``root`` at ``http://127.0.0.1:{port}/pnfs``; start() and stop() it."""

    def __init__(self, root: Path, port: int | None = None, *, tls: Any = None) -> None:
        self.tls = tls  # a trustme.CA: serve https with a certificate it issued
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.faults = Faults()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{PREFIX}"

    def start(self) -> WebdavServer:
        from cheroot import wsgi
        from wsgidav.wsgidav_app import WsgiDAVApp

        config = {
            "provider_mapping": {PREFIX: str(self.root)},
            "simple_dc": {"user_mapping": {"*": True}},  # the middleware checks the token
            "http_authenticator": {"accept_basic": False, "accept_digest": False},
            "verbose": 1,
            "logging": {"enable": False, "enable_loggers": []},
            "lock_storage": True,
        }
        app = DcacheMiddleware(WsgiDAVApp(config), self.root, self.faults)
        self._server = wsgi.Server(("127.0.0.1", self.port), app, numthreads=4)
        self._server.expiration_interval = 0.05  # how long stop() waits for the serve loop
        if self.tls is not None:
            from cheroot.ssl.builtin import BuiltinSSLAdapter

            cert = self.tls.issue_cert("127.0.0.1", "localhost")
            certfile, keyfile = self.root.parent / "door.pem", self.root.parent / "door.key"
            cert.cert_chain_pems[0].write_to_path(str(certfile))
            cert.private_key_pem.write_to_path(str(keyfile))
            self._server.ssl_adapter = BuiltinSSLAdapter(str(certfile), str(keyfile))
        self._server.prepare()
        self._thread = threading.Thread(target=self._server.serve, daemon=True)
        self._thread.start()
        return self

    def start_after(self, seconds: float) -> threading.Timer:
        timer = threading.Timer(seconds, self.start)
        timer.start()
        return timer

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def files(self) -> dict[str, bytes]:
        """Everything stored, by path below the root (hidden names included)."""
        return {
            str(p.relative_to(self.root)): p.read_bytes()
            for p in sorted(self.root.rglob("*"))
            if p.is_file()
        }


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def webdav(tmp_path: Path) -> Iterator[WebdavServer]:
    """A running wsgidav server on loopback storing below ``tmp_path / 'door'``."""
    logging.getLogger("wsgidav").setLevel(logging.WARNING)
    server = WebdavServer(tmp_path / "door").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def webdav_down(tmp_path: Path) -> Iterator[WebdavServer]:
    """A server object whose port nobody listens on yet (``start()`` or ``start_after()``)."""
    server = WebdavServer(tmp_path / "door")
    try:
        yield server
    finally:
        server.stop()
