"""Storage events: one message per file stored at its destination.

The message value is a dCache Kafka ``billing`` *transfer* record for a write (the field names and
types dCache's ``MoverInfoMessageSerializer`` emits, see ``shared/examples/``), so consumers that
already read dCache's ``billing`` topic (``msgType == "transfer"``, ``isWrite == "write"``) work
unchanged, plus one object of our own, ``calstream``, with what a data-management engine needs
(checksum, destination URL, run, trains, ...). The headers follow the CloudEvents Kafka binary
binding; the key is the file path at the destination.

Mapping of dCache's roles: calstream is the *client* that wrote the file (``protocolInfo.host``
is our host, as dCache puts the client there), the destination is the *server* (``localEndpoint``
is its ``host:port``, empty for ``file://``).

The JSON Schema of the value ships as package data (``storage-event.schema.json``); see
:func:`storage_event_schema`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from importlib import resources
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from calstream.errors import ConfigError, EventError

if TYPE_CHECKING:  # the store package pulls in h5py; events must stay light for the CLI
    from calstream.store.records import FileInfo, StoredFile

__all__ = [
    "CE_TYPE_FILE_STORED",
    "EventSettings",
    "StorageEvent",
    "build_storage_event",
    "storage_event_schema",
]

CE_TYPE_FILE_STORED = "eu.xfel.calstream.file.stored"
CALSTREAM_RECORD_VERSION = 1  # version of our ``calstream`` object inside the value

_SCHEMA_RESOURCE = "storage-event.schema.json"
_ADLER32 = re.compile(r"[0-9a-f]{8}")
# dCache's protocol names (``protocolInfo.protocol``) and versions for our destination schemes.
_PROTOCOLS: dict[str, tuple[str, int, int]] = {
    "file": ("file", 0, 0),
    "http": ("Http", 1, 1),
    "https": ("Http", 1, 1),
    "dav": ("Http", 1, 1),
    "davs": ("Http", 1, 1),
    "webdav": ("Http", 1, 1),
}
_session_counter = itertools.count(1)


def _hostname() -> str:
    return socket.gethostname() or "localhost"


def _default_ce_source() -> str:
    return f"calstream://{_hostname()}"


@dataclass(frozen=True)
class EventSettings:
    """Who announces the files: the billing-record identity and the CloudEvents attributes.

    Parameters
    ----------
    cell_name, cell_type, cell_domain
        dCache's ``cellName``/``cellType``/``cellDomain``; the domain defaults to the hostname.
    storage_info
        dCache's ``storageInfo`` (e.g. ``"xfel:corr@osm"``), empty when unknown.
    initiator
        dCache's ``initiator`` (who asked for the transfer).
    subject
        dCache's ``subject`` principals, e.g. ``("UserNamePrincipal[calib]",)``.
    host
        Our host, reported as the client in ``protocolInfo.host``.
    ce_source, ce_type
        CloudEvents ``source`` (a URI reference) and ``type``.
    """

    cell_name: str = "calstream"
    cell_type: str = "calstream"
    cell_domain: str = field(default_factory=_hostname)
    storage_info: str = ""
    initiator: str = "calstream"
    subject: tuple[str, ...] = ()
    host: str = field(default_factory=_hostname)
    ce_source: str = field(default_factory=_default_ce_source)
    ce_type: str = CE_TYPE_FILE_STORED

    def __post_init__(self) -> None:
        if isinstance(self.subject, str) or not all(isinstance(s, str) for s in self.subject):
            raise ConfigError(
                f"must be a list of principal strings. Got {self.subject!r} instead.",
                key="events.subject",
            )
        object.__setattr__(self, "subject", tuple(self.subject))
        for name in ("cell_name", "cell_type", "cell_domain", "ce_source", "ce_type"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(
                    f"must be a non-empty string. Got {value!r} instead.", key=f"events.{name}"
                )
        for name in ("storage_info", "initiator", "host"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(
                    f"must be a string. Got {getattr(self, name)!r} instead.", key=f"events.{name}"
                )


@dataclass(frozen=True)
class StorageEvent:
    """One storage event, ready for ``AIOKafkaProducer.send``.

    ``value`` is plain JSON data (treat it as read-only); ``headers`` are ``(name, bytes)``
    pairs in the CloudEvents Kafka binary binding; ``key`` is the file path at the destination.
    """

    id: str
    key: str
    value: dict[str, Any]
    headers: tuple[tuple[str, bytes], ...]

    def value_bytes(self) -> bytes:
        """The value as compact UTF-8 JSON (what goes on the wire and into the outbox)."""
        return _dumps(self.value)

    def key_bytes(self) -> bytes:
        """The Kafka message key: the destination path, UTF-8 encoded."""
        return self.key.encode()


def build_storage_event(
    stored: StoredFile,
    info: FileInfo,
    settings: EventSettings | None = None,
    *,
    now: datetime | None = None,
    event_id: str | None = None,
) -> StorageEvent:
    """Build the storage event for a file stored at its destination.

    Parameters
    ----------
    stored
        Where and how the file was stored (path, URL, size, adler32, transfer time).
    info
        What the writer knows about the file (run, trains, sources, compression, constants).
    settings
        Identity of the announcer; ``EventSettings()`` when None.
    now
        Time of the event (default: now); naive datetimes are taken as local time.
    event_id
        Event id (default: a fresh UUID4); consumers de-duplicate on it.

    Raises
    ------
    EventError
        If the stored-file record cannot make a valid event (bad checksum format, negative
        size, non-finite transfer time). Not retriable.
    """
    settings = settings if settings is not None else EventSettings()
    now = now or datetime.now()
    if now.tzinfo is None:
        now = now.astimezone()  # local time, with its offset
    event_id = event_id or str(uuid.uuid4())
    path = stored.path
    adler32 = _check_stored(stored)

    seconds = float(stored.transfer_time_s)
    protocol, major, minor = _PROTOCOLS.get(stored.protocol.lower(), (stored.protocol, 0, 0))
    epoch_ms = int(now.timestamp() * 1000)
    value: dict[str, Any] = {
        "version": "1.0",
        "msgType": "transfer",
        "date": now.isoformat(timespec="milliseconds"),
        "queuingTime": 0,
        "cellName": settings.cell_name,
        "cellType": settings.cell_type,
        "cellDomain": settings.cell_domain,
        "meanWriteBandwidth": stored.size / seconds if seconds > 0 else 0.0,
        "writeIdle": "PT0S",
        "writeActive": _java_duration(seconds),
        "localEndpoint": f"{stored.host}:{stored.port}" if stored.host else "",
        "status": {"code": 0, "msg": ""},
        "session": (
            f"{settings.cell_type}:{settings.cell_name}@{settings.cell_domain}:"
            f"{epoch_ms}-{next(_session_counter)}"
        ),
        "subject": list(settings.subject),
        "pnfsid": None,
        "billingPath": path,
        "fileSize": stored.size,
        "storageInfo": settings.storage_info,
        "transferSize": stored.size,
        "transferTime": round(seconds * 1000),
        "isWrite": "write",
        "protocolInfo": {
            "protocol": protocol,
            "versionMajor": major,
            "versionMinor": minor,
            "transferTag": "",
            "port": 0,
            "host": settings.host,
        },
        "initiator": settings.initiator,
        "isP2p": False,
        "transferPath": path,
        "calstream": {
            "version": CALSTREAM_RECORD_VERSION,
            "event_id": event_id,
            "checksum": {"adler32": adler32},
            "destination": stored.url,
            "relpath": info.relpath,
            "run": info.run,
            "proposal": info.proposal,
            "sequence": info.sequence,
            "detector": info.detector,
            "module": info.module,
            "sources": list(info.sources),
            "first_train": info.first_train,
            "last_train": info.last_train,
            "trains": info.trains,
            "frames": info.frames,
            "compression": _jsonable(info.compression),
            "constants": _jsonable(info.constants),
        },
    }
    ce_time = now.astimezone(UTC).isoformat(timespec="milliseconds")
    headers = (
        ("ce_specversion", b"1.0"),
        ("ce_id", event_id.encode()),
        ("ce_source", settings.ce_source.encode()),
        ("ce_type", settings.ce_type.encode()),
        ("ce_time", ce_time.replace("+00:00", "Z").encode()),
        ("ce_subject", path.encode()),
        ("content-type", b"application/json"),
    )
    return StorageEvent(id=event_id, key=path, value=value, headers=headers)


def storage_event_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a storage event's value, loaded from package data."""
    text = resources.files(__package__).joinpath(_SCHEMA_RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)


def _check_stored(stored: StoredFile) -> str:
    """Return the normalised adler32; reject records that would make an invalid event."""
    adler32 = stored.adler32.lower() if isinstance(stored.adler32, str) else ""
    problems = []
    if not _ADLER32.fullmatch(adler32):
        problems.append(f"adler32 must be 8 hex digits. Got {stored.adler32!r} instead.")
    if not isinstance(stored.size, int) or stored.size < 0:
        problems.append(f"size must be an integer >= 0. Got {stored.size!r} instead.")
    seconds = stored.transfer_time_s
    if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0:
        problems.append(f"transfer time must be finite and >= 0 s. Got {seconds!r} instead.")
    if not stored.path:
        problems.append("the stored file has no path")
    if problems:
        err = EventError("cannot build a storage event: " + "; ".join(problems), key=stored.path)
        err.retriable = False  # the same record fails the same way again
        raise err
    return adler32


def _java_duration(seconds: float) -> str:
    """Format a duration the way Java's ``Duration.toString`` does (``PT1H2M3.5S``)."""
    total_ns = round(seconds * 1_000_000_000)
    if total_ns == 0:
        return "PT0S"
    hours, rest = divmod(total_ns, 3_600 * 1_000_000_000)
    minutes, rest = divmod(rest, 60 * 1_000_000_000)
    secs, nanos = divmod(rest, 1_000_000_000)
    out = "PT"
    if hours:
        out += f"{hours}H"
    if minutes:
        out += f"{minutes}M"
    if secs or nanos:
        out += f"{secs}.{nanos:09d}".rstrip("0").rstrip(".") + "S"
    return out


def _jsonable(obj: Any) -> Any:
    """Turn provenance (paths, NumPy values, bytes from HDF5 attributes) into plain JSON data."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        return bytes(obj).decode("utf-8", errors="replace")
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return sorted((_jsonable(v) for v in obj), key=repr)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # NumPy scalars and arrays
        return _jsonable(obj.tolist())
    return str(obj)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
