"""Receive Karabo Bridge trains over ZeroMQ: PULL, SUB or REQ.

One :class:`Receiver` per thread (ZeroMQ sockets are not thread-safe). Frames are received with
``copy=False`` and decoded zero-copy by :func:`~calstream.ingest.karabo_bridge.decode`.
"""

from __future__ import annotations

import logging
from types import TracebackType

import zmq

from calstream.errors import CalstreamError, ConfigError
from calstream.ingest.karabo_bridge import Data, Metadata, decode

__all__ = ["PATTERNS", "Receiver"]

log = logging.getLogger(__name__)

PATTERNS: dict[str, int] = {"pull": zmq.PULL, "sub": zmq.SUB, "req": zmq.REQ}
"""Socket patterns a :class:`Receiver` speaks, by name."""

_REQUEST = b"next"


class Receiver:
    """A ZeroMQ socket that yields decoded trains.

    Parameters
    ----------
    endpoint
        ZeroMQ endpoint, e.g. ``tcp://host:4545`` (``tcp://127.0.0.1:*`` with ``bind=True``
        binds a free port; :attr:`endpoint` then names it).
    pattern
        ``"pull"`` (from PUSH), ``"sub"`` (from PUB, all topics) or ``"req"`` (from REP: sends
        ``b"next"`` before each train, as ``karabo_bridge.Client`` does).
    bind
        Bind instead of connecting (the default).
    hwm
        Receive high-water mark in messages (trains).
    context
        ZeroMQ context; default the process-wide ``zmq.Context.instance()``.
    max_array_bytes
        Largest array accepted in a message.

    Raises
    ------
    ConfigError
        An unknown pattern, or an endpoint ZeroMQ cannot bind or connect (``source`` is the
        endpoint).
    """

    def __init__(self, endpoint: str, pattern: str = "pull", *, bind: bool = False,
                 hwm: int = 4, context: zmq.Context | None = None,
                 max_array_bytes: int = 2**31) -> None:
        if pattern not in PATTERNS:
            raise ConfigError(f"unknown receiver pattern {pattern!r}; known: "
                              f"{', '.join(PATTERNS)}", key="pattern")
        if hwm < 1:
            raise ConfigError(f"hwm must be at least 1. Got {hwm} instead.", key="hwm")
        self.pattern = pattern
        self.bind = bind
        self.hwm = hwm
        self.max_array_bytes = max_array_bytes
        self.bytes_received = 0
        self.messages_received = 0
        self._requested_endpoint = endpoint
        self._bound_endpoint: str | None = None
        self._context = context if context is not None else zmq.Context.instance()
        self._awaiting_reply = False
        self._socket: zmq.Socket | None = None
        self._socket = self._open()

    @property
    def endpoint(self) -> str:
        """The endpoint: the one actually bound (free port resolved) or the one connected."""
        return self._bound_endpoint or self._requested_endpoint

    def _open(self) -> zmq.Socket:
        sock = self._context.socket(PATTERNS[self.pattern])
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, self.hwm)
            if self.pattern == "sub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            if self.bind:
                # after a REQ reset, rebind the port resolved the first time
                sock.bind(self._bound_endpoint or self._requested_endpoint)
                self._bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                sock.connect(self._requested_endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            verb = "bind" if self.bind else "connect"
            raise ConfigError(f"cannot {verb} a {self.pattern.upper()} socket: {exc}",
                              source=self._requested_endpoint) from exc
        log.debug("%s socket %s to %s", self.pattern.upper(),
                  "bound" if self.bind else "connected", self._requested_endpoint)
        return sock

    def receive(self, timeout: float | None = None) -> tuple[Data, Metadata] | None:
        """Wait for the next train and decode it.

        Parameters
        ----------
        timeout
            Seconds to wait; None waits for ever.

        Returns
        -------
        (data, metadata) or None
            None when nothing arrived in time. A REQ socket is then recreated, so the next call
            sends a fresh request instead of sticking in the REQ state machine.

        Raises
        ------
        ProtocolError
            A malformed message; it has been consumed and the receiver stays usable.
        CalstreamError
            The socket failed (closed, context terminated), naming the endpoint.
        """
        sock = self._socket
        if sock is None:
            raise CalstreamError("receiver is closed", source=self._requested_endpoint)
        timeout_ms = None if timeout is None else max(0, round(timeout * 1000))
        try:
            if self.pattern == "req" and not self._awaiting_reply:
                if not sock.poll(timeout_ms, zmq.POLLOUT):
                    self._reset_req()
                    return None
                sock.send(_REQUEST)
                self._awaiting_reply = True
            if not sock.poll(timeout_ms, zmq.POLLIN):
                if self.pattern == "req":
                    self._reset_req()
                return None
            frames = sock.recv_multipart(copy=False)
        except zmq.ZMQError as exc:
            raise CalstreamError(f"ZeroMQ error on {self.pattern.upper()} socket: {exc}",
                                 source=self._requested_endpoint) from exc
        self._awaiting_reply = False
        self.messages_received += 1
        self.bytes_received += sum(len(f) for f in frames)
        return decode(frames, max_array_bytes=self.max_array_bytes)

    def _reset_req(self) -> None:
        """Replace a REQ socket left waiting for a reply that did not come."""
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = None
        self._awaiting_reply = False
        self._socket = self._open()
        log.debug("REQ socket to %s recreated after a timeout", self._requested_endpoint)

    def close(self) -> None:
        """Close the socket (safe to call twice). A context passed in is left open."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        how = "bound" if self.bind else "connected"
        return f"<Receiver {self.pattern.upper()} {how} {self.endpoint}>"
