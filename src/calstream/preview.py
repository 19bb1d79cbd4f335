"""Live preview: re-publish a few corrected trains on a Karabo Bridge 2.2 endpoint.

Viewers (``karabo_bridge.Client``, EXtra-foam, OnDA) connect to it and see the corrected
stream, thinned to 1 train in ``every`` and at most ``max_rate`` trains per second so that the
preview never costs the pipeline more than a copy of those few trains. It never holds the
pipeline up: PUB drops for slow subscribers, and REP serves the newest train each viewer
request finds (older unseen ones are skipped).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq

from .errors import ConfigError
from .ingest.karabo_bridge import encode

__all__ = ["PreviewPublisher"]

log = logging.getLogger(__name__)

_SOCKETS = {"pub": zmq.PUB, "rep": zmq.REP}


class PreviewPublisher:
    """Bind a PUB or REP socket and serve the trains :meth:`publish` is given.

    Parameters
    ----------
    endpoint
        Where to bind, e.g. ``tcp://*:4600`` (``tcp://127.0.0.1:*`` picks a free port;
        :attr:`endpoint` names it).
    pattern
        ``"pub"`` or ``"rep"`` (answers each ``b"next"`` with the newest train).
    every
        Offer 1 train in ``every``.
    max_rate
        At most this many trains per second (0: no limit).
    """

    def __init__(self, endpoint: str, pattern: str = "pub", *, every: int = 10,
                 max_rate: float = 2.0) -> None:
        if pattern not in _SOCKETS:
            raise ConfigError(f"unknown preview pattern {pattern!r}; known: pub, rep",
                              key="preview.pattern")
        self.pattern = pattern
        self.every = max(1, every)
        self.min_interval = 1.0 / max_rate if max_rate > 0 else 0.0
        self.sent = 0
        self._context = zmq.Context()
        self._socket = self._context.socket(_SOCKETS[pattern])
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.SNDHWM, 2)
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            self._context.term()
            raise ConfigError(f"cannot bind the preview {pattern.upper()} socket to "
                              f"{endpoint!r}: {exc}", key="preview.endpoint") from None
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Condition()
        self._seen = 0
        self._last_offer = -float("inf")
        self._latest: tuple[int, list[Any]] | None = None
        self._served = 0  # train id last sent
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="calstream-preview",
                                        daemon=True)
        self._thread.start()
        log.info("live preview of corrected trains on %s (%s, 1 in %d, at most %s Hz)",
                 self.endpoint, pattern.upper(), self.every,
                 f"{1 / self.min_interval:g}" if self.min_interval else "any")

    def wants(self, train_id: int) -> bool:
        """Whether this train should be copied for the preview (thread-safe, cheap)."""
        with self._lock:
            self._seen += 1
            if (self._seen - 1) % self.every:
                return False
            now = time.monotonic()
            if now - self._last_offer < self.min_interval:
                return False
            self._last_offer = now
            return True

    def publish(self, train_id: int, data: dict[str, dict[str, Any]], *,
                timestamp_ns: int = 0) -> None:
        """Hand a corrected train over; it replaces one not yet sent (never blocks).

        ``data`` is ``{source: {key: array}}``; the metadata is built as a Karabo bridge does
        (``timestamp.tid``, and the timestamp keys when ``timestamp_ns`` is known).
        """
        stamp: dict[str, Any] = {"timestamp.tid": train_id}
        if timestamp_ns:
            sec, ns = divmod(timestamp_ns, 1_000_000_000)
            stamp |= {"timestamp": timestamp_ns / 1e9, "timestamp.sec": str(sec),
                      "timestamp.frac": f"{ns * 10**9:018d}"}
        frames = encode(data, {src: {"source": src, **stamp} for src in data})
        with self._lock:
            self._latest = (train_id, frames)
            self._lock.notify_all()

    def _take(self, timeout: float) -> tuple[int, list[Any]] | None:
        with self._lock:
            self._lock.wait_for(lambda: self._closing or (
                self._latest is not None and self._latest[0] != self._served), timeout)
            if self._closing or self._latest is None or self._latest[0] == self._served:
                return None
            self._served = self._latest[0]
            return self._latest

    def _serve(self) -> None:
        sock = self._socket
        try:
            while not self._closing:
                if self.pattern == "rep":
                    if not sock.poll(200, zmq.POLLIN):
                        continue
                    request = sock.recv()
                    item = None
                    while item is None and not self._closing:
                        item = self._take(0.2)
                    if item is None:
                        sock.send(b"Error: calstream is stopping")
                        return
                    if request != b"next":
                        log.warning("preview: unexpected request %r", request[:40])
                else:
                    item = self._take(0.2)
                    if item is None:
                        continue
                try:
                    sock.send_multipart(item[1], copy=False,
                                        flags=zmq.NOBLOCK if self.pattern == "pub" else 0)
                except zmq.Again:
                    continue  # PUB with no room: a slow viewer misses this one
                self.sent += 1
        except zmq.ZMQError as exc:
            if not self._closing:
                log.error("preview socket %s failed, preview stopped: %s", self.endpoint, exc)

    def close(self) -> None:
        """Stop serving and close the socket (safe to call twice)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout=5)
        self._socket.close(linger=0)
        self._context.term()
