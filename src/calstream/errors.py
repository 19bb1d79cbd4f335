"""The calstream error tree.

Every error calstream raises on purpose derives from :class:`CalstreamError` and mixes in the
builtin it resembles, so ``except ValueError`` keeps working for callers that do not know us::

    CalstreamError
    ├── ConfigError (ValueError)          bad or missing configuration: file, key, reason
    ├── ProtocolError (ValueError)        a malformed Karabo Bridge message: source, train
    │   └── UnsupportedProtocolError      protocol 1.0 or an unknown content type
    ├── DataError (ValueError)            data of the wrong dtype/shape for the detector
    ├── ConstantsError (ValueError)       a missing or mis-shaped calibration constant
    ├── StoreError (OSError)              writing, storing or checksumming a file  [retriable]
    │   └── ChecksumMismatch              the destination's checksum differs from ours
    └── EventError (RuntimeError)         recording or publishing a storage event [retriable]
        └── PublishError                  a Kafka client error, translated (its retriable)

Each error carries ``source``, ``train_id`` and ``key`` where known and names them in its
message; ``retriable`` tells the uploader and the outbox relay whether trying again may help.
"""

from __future__ import annotations

__all__ = [
    "CalstreamError",
    "ChecksumMismatch",
    "ConfigError",
    "ConstantsError",
    "DataError",
    "EventError",
    "ProtocolError",
    "PublishError",
    "StoreError",
    "UnsupportedProtocolError",
]


class CalstreamError(Exception):
    """Root of all calstream errors."""

    retriable: bool = False

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        train_id: int | None = None,
        key: str | None = None,
        retriable: bool | None = None,
    ) -> None:
        self.message = message
        if retriable is not None:
            self.retriable = retriable  # this instance differs from its class
        self.source = source
        self.train_id = train_id
        self.key = key
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.source is not None:
            where.append(f"source {self.source!r}")
        if self.train_id is not None:
            where.append(f"train {self.train_id}")
        if self.key is not None:
            where.append(f"key {self.key!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class ConfigError(CalstreamError, ValueError):
    """Invalid configuration. ``source`` is the config file, ``key`` the dotted key."""

    def _format(self) -> str:
        parts = [p for p in (self.source, self.key) if p]
        return f"{': '.join(parts)}: {self.message}" if parts else self.message


class ProtocolError(CalstreamError, ValueError):
    """A malformed Karabo Bridge message."""


class UnsupportedProtocolError(ProtocolError):
    """A message in a protocol version or content type calstream does not speak."""


class DataError(CalstreamError, ValueError):
    """Data that does not fit the configured detector (dtype, shape, missing key)."""


class ConstantsError(CalstreamError, ValueError):
    """A calibration constant that is missing or does not fit. ``source`` is the file."""


class StoreError(CalstreamError, OSError):
    """Writing a file, storing it at its destination or checksumming it failed."""

    retriable = True


class ChecksumMismatch(StoreError):
    """The checksum the destination reports differs from the one calstream computed."""


class EventError(CalstreamError, RuntimeError):
    """Recording or publishing a storage event failed."""

    retriable = True


class PublishError(EventError):
    """A Kafka client call failed. ``source`` is the broker list, ``key`` the topic.

    ``retriable`` is the Kafka error's own (a refused connection is, a too-large message is not).
    """
