"""Receive Karabo Bridge trains over ZeroMQ: PULL, SUB or REQ.

One :class:`Receiver` per thread (ZeroMQ sockets are not thread-safe). Frames are received with
``copy=False`` and decoded zero-copy by :func:`~calstream.ingest.karabo_bridge.decode`.
"""

from __future__ import annotations

import logging
import math
import time
from types import TracebackType

import zmq

from calstream.errors import CalstreamError, ConfigError
from calstream.ingest.karabo_bridge import Data, Metadata, decode

__all__ = ["PATTERNS", "Receiver"]

log = logging.getLogger(__name__)

PATTERNS: dict[str, int] = {"pull": zmq.PULL, "sub": zmq.SUB, "req": zmq.REQ}
"""Socket patterns a :class:`Receiver` speaks, by name."""

_REQUEST = b"next"


def _remaining_ms(deadline: float | None) -> int | None:
    """Milliseconds until ``deadline`` (a ``time.monotonic()`` value), rounded up; None: never."""
    if deadline is None:
        return None
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


class Receiver:
    """A ZeroMQ socket that yields decoded trains.

    Parameters
    ----------
    endpoint
        ZeroMQ endpoint, e.g. ``tcp://host:4545`` (``tcp://127.0.0.1:*`` with ``bind=True``
        binds a free port; :attr:`endpoint` then names it).
    pattern
        ``"pull"`` (from PUSH), ``"sub"`` (from PUB, all topics) or ``"req"`` (from REP: sends
        ``b"next"`` before each train, as ``karabo_bridge.Client`` does; the request stays
        outstanding across :meth:`receive` calls until its reply arrives).
    bind
        Bind instead of connecting (the default).
    hwm
        Receive high-water mark in messages (trains).
    context
        ZeroMQ context; default the process-wide ``zmq.Context.instance()``.
    max_array_bytes
        Largest array accepted in a message.
    reply_timeout
        REQ only: seconds to wait for the reply to a request, counted from when it was sent
        and across :meth:`receive` calls, before giving up on it and recreating the socket
        (e.g. the server restarted and lost the request); None never gives up.

    Attributes
    ----------
    req_resets
        How many times a REQ socket was recreated after ``reply_timeout`` (each may have lost
        a train).

    Raises
    ------
    ConfigError
        An unknown pattern, a bad ``hwm`` or ``reply_timeout``, or an endpoint ZeroMQ cannot
        bind or connect (``source`` is the endpoint).
    """

    def __init__(self, endpoint: str, pattern: str = "pull", *, bind: bool = False,
                 hwm: int = 4, context: zmq.Context | None = None,
                 max_array_bytes: int = 2**31, reply_timeout: float | None = 30.0) -> None:
        if pattern not in PATTERNS:
            raise ConfigError(f"unknown receiver pattern {pattern!r}; known: "
                              f"{', '.join(PATTERNS)}", key="pattern")
        if hwm < 1:
            raise ConfigError(f"hwm must be at least 1. Got {hwm} instead.", key="hwm")
        if reply_timeout is not None and not reply_timeout > 0:
            raise ConfigError(f"reply_timeout must be positive seconds or None. Got "
                              f"{reply_timeout!r} instead.", key="reply_timeout")
        self.pattern = pattern
        self.bind = bind
        self.hwm = hwm
        self.max_array_bytes = max_array_bytes
        self.reply_timeout = reply_timeout
        self.bytes_received = 0
        self.messages_received = 0
        self.req_resets = 0
        self._requested_endpoint = endpoint
        self._bound_endpoint: str | None = None
        self._context = context if context is not None else zmq.Context.instance()
        self._awaiting_reply = False
        self._request_sent_at = 0.0  # time.monotonic() of the outstanding request
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
            None when nothing arrived in time. A REQ request then stays outstanding: the next
            call keeps waiting for its reply instead of sending another, so a slow server's
            reply is not lost. Only after ``reply_timeout`` without a reply is the REQ socket
            recreated (a warning is logged, :attr:`req_resets` counted) and a new request sent.

        Raises
        ------
        ProtocolError
            A malformed message; it has been consumed (for REQ, its request is complete) and
            the receiver stays usable.
        CalstreamError
            The socket failed (closed, context terminated), naming the endpoint.
        """
        sock = self._socket
        if sock is None:
            raise CalstreamError("receiver is closed", source=self._requested_endpoint)
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        try:
            if self.pattern == "req":
                frames = self._receive_req(deadline)
                if frames is None:
                    return None
            else:
                if not sock.poll(_remaining_ms(deadline), zmq.POLLIN):
                    return None
                frames = sock.recv_multipart(copy=False)
        except zmq.ZMQError as exc:
            raise CalstreamError(f"ZeroMQ error on {self.pattern.upper()} socket: {exc}",
                                 source=self._requested_endpoint) from exc
        self.messages_received += 1
        self.bytes_received += sum(len(f) for f in frames)
        return decode(frames, max_array_bytes=self.max_array_bytes)

    def _receive_req(self, deadline: float | None) -> list[zmq.Frame] | None:
        """Send a request unless one is outstanding, then wait for its reply until ``deadline``.

        Returns the reply's frames (the request is then complete), or None at ``deadline``
        with the request still outstanding. Past ``reply_timeout`` the socket is recreated
        and, time permitting, a new request sent.
        """
        while True:
            sock = self._socket
            assert sock is not None
            if not self._awaiting_reply:
                if not sock.poll(_remaining_ms(deadline), zmq.POLLOUT):
                    return None  # no server connected yet; nothing sent
                sock.send(_REQUEST)
                self._awaiting_reply = True
                self._request_sent_at = time.monotonic()
            reply_deadline = (None if self.reply_timeout is None
                              else self._request_sent_at + self.reply_timeout)
            wait_until = deadline
            if reply_deadline is not None and (deadline is None or reply_deadline < deadline):
                wait_until = reply_deadline
            if sock.poll(_remaining_ms(wait_until), zmq.POLLIN):
                frames = sock.recv_multipart(copy=False)
                self._awaiting_reply = False
                return frames
            now = time.monotonic()
            if reply_deadline is not None and now >= reply_deadline:
                self._reset_req()
            if deadline is not None and now >= deadline:
                return None

    def _reset_req(self) -> None:
        """Replace a REQ socket whose request got no reply within ``reply_timeout``."""
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = None
        self._awaiting_reply = False
        self.req_resets += 1
        log.warning("no reply from REP server %s within %s s of the request; recreating the "
                    "REQ socket (a train may have been lost)", self._requested_endpoint,
                    self.reply_timeout)
        self._socket = self._open()

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
