"""The durable event outbox: storage events wait here, in SQLite, until a broker has them.

Every storage event is committed here before the store stage moves on (``add`` returns only after
the commit is on disk: WAL journal, ``synchronous=FULL``), so a ``kill -9`` at any point loses
nothing that was acknowledged. With no Kafka configured the events stay ``pending`` and the
outbox *is* the event log (``calstream events list SPOOL``).

A relay (:class:`calstream.events.kafka.KafkaPublisher`) publishes at least once and in order::

    while batch := outbox.pending(limit=100):     # oldest first, by seq
        try:
            await send_all_and_wait_for_acks(batch)  # key=entry.key_bytes(), value=entry.value,
        except KafkaError as exc:                    # headers=list(entry.headers)
            outbox.mark_failed(batch[0].event_id, str(exc))
            break                                    # retry later from the same seq: order kept
        outbox.mark_sent(e.event_id for e in batch)

A crash between the broker's ack and ``mark_sent`` sends the batch again; consumers de-duplicate
by event id (the CloudEvents ``ce_id``). Sent events are kept (state ``sent``) as the log.

Concurrency: one connection per ``Outbox``, shared by the threads of a process behind a lock;
other processes (the CLI) open their own, usually with ``readonly=True``. WAL lets readers see
every committed row without blocking the writer. Do not carry an open ``Outbox`` across
``fork()``; open one in the child instead.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from calstream.errors import ConfigError, EventError
from calstream.events.schema import StorageEvent

__all__ = ["OUTBOX_FILENAME", "STATES", "Outbox", "OutboxEntry", "format_entries"]

log = logging.getLogger(__name__)

OUTBOX_FILENAME = "outbox.sqlite3"
STATES = ("pending", "sent")
_SCHEMA_VERSION = 1
_MAX_ERROR_CHARS = 2000
_COLUMNS = "seq, event_id, key, value, headers, created, state, sent_at, attempts, last_error"
_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS events (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id   TEXT    NOT NULL UNIQUE,
        key        TEXT    NOT NULL,
        value      BLOB    NOT NULL,
        headers    TEXT    NOT NULL,
        created    TEXT    NOT NULL,
        state      TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent')),
        sent_at    TEXT,
        attempts   INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS events_state_seq ON events (state, seq)",
    "CREATE INDEX IF NOT EXISTS events_key ON events (key)",
    f"PRAGMA user_version = {_SCHEMA_VERSION}",
)


@dataclass(frozen=True)
class OutboxEntry:
    """One row of the outbox: a storage event and its publishing state.

    ``value`` and ``headers`` are exactly what goes to Kafka (``value`` is the event's
    ``value_bytes()``); ``created`` and ``sent_at`` are ISO-8601 UTC times.
    """

    seq: int
    event_id: str
    key: str
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    created: str
    state: str
    sent_at: str | None
    attempts: int
    last_error: str | None

    def key_bytes(self) -> bytes:
        """The Kafka message key (the destination path, UTF-8)."""
        return self.key.encode()

    def record(self) -> dict[str, Any]:
        """The value decoded from JSON."""
        return json.loads(self.value)

    def event(self) -> StorageEvent:
        """The entry as a :class:`StorageEvent` again."""
        return StorageEvent(
            id=self.event_id, key=self.key, value=self.record(), headers=self.headers
        )


class Outbox:
    """Durable, ordered store of storage events (SQLite in WAL mode).

    Parameters
    ----------
    path
        The database file (created with its parent directory unless ``readonly``).
    readonly
        Open an existing outbox for reading only (e.g. from the CLI while the pipeline runs).
    timeout
        Seconds to wait for another connection's write lock before failing.

    Raises
    ------
    EventError
        If the file cannot be opened as an outbox (missing when ``readonly``, not SQLite, written
        by a newer calstream, filesystem without WAL support).
    """

    def __init__(self, path: str | Path, *, readonly: bool = False, timeout: float = 30.0) -> None:
        self._path = Path(path)
        self._readonly = readonly
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        with self._translate("open"):
            self._conn = self._connect(timeout)
            try:
                self._prepare()
            except BaseException:
                self._conn.close()
                self._conn = None
                raise

    @classmethod
    def in_spool(cls, spool_root: str | Path, **kwargs: Any) -> Outbox:
        """Open the outbox that lives in a spool directory (``SPOOL/outbox.sqlite3``)."""
        return cls(Path(spool_root) / OUTBOX_FILENAME, **kwargs)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def __repr__(self) -> str:
        mode = "readonly" if self._readonly else "readwrite"
        state = "closed" if self._conn is None else "open"
        return f"<Outbox {str(self._path)!r} {mode} {state}>"

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------

    def add(self, event: StorageEvent) -> bool:
        """Record an event durably; True if added, False if its id was already there.

        Returns only after the row is committed and synced to disk.
        """
        headers = _encode_headers(event.headers, event_id=event.id)
        with self._write("add") as conn:
            # the write lock is held from BEGIN IMMEDIATE: look-up then insert is race-free, and
            # a duplicate does not use up a seq number (AUTOINCREMENT would on an ignored insert)
            found = conn.execute("SELECT key FROM events WHERE event_id = ?", (event.id,))
            row = found.fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO events (event_id, key, value, headers, created)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (event.id, event.key, event.value_bytes(), headers, _utcnow()),
                )
                return True
        (key,) = row
        if key != event.key:
            raise EventError(
                f"event id {event.id} is already recorded for another file ({key!r})",
                source=str(self._path),
                key=event.key,
            )
        log.debug("event %s for %s already in the outbox", event.id, event.key)
        return False

    def mark_sent(self, event_ids: Iterable[str]) -> int:
        """Mark events as acknowledged by the broker; returns how many changed state.

        Unknown ids and events already sent are ignored (a relay may ack twice).
        """
        now = _utcnow()
        ids = [(now, event_id) for event_id in event_ids]
        with self._write("mark_sent") as conn:
            cur = conn.executemany(
                "UPDATE events SET state = 'sent', sent_at = ?, attempts = attempts + 1"
                " WHERE event_id = ? AND state = 'pending'",
                ids,
            )
            return cur.rowcount

    def mark_failed(self, event_id: str, error: str) -> bool:
        """Count a failed publishing attempt; the event stays pending, in its place.

        Returns False if the event is unknown or already sent.
        """
        error = str(error)[:_MAX_ERROR_CHARS]
        with self._write("mark_failed") as conn:
            cur = conn.execute(
                "UPDATE events SET attempts = attempts + 1, last_error = ?"
                " WHERE event_id = ? AND state = 'pending'",
                (error, event_id),
            )
            return cur.rowcount == 1

    def mark_pending(self, since: datetime) -> int:
        """Make events recorded at or after ``since`` pending again (``events replay``).

        They keep their event ids, so consumers that saw them already de-duplicate them; the
        relay sends them again in their original order. Returns how many changed state.
        """
        if since.tzinfo is None:
            since = since.astimezone()  # local time
        stamp = since.astimezone(UTC).isoformat(timespec="milliseconds")
        with self._write("mark_pending") as conn:
            cur = conn.execute(
                "UPDATE events SET state = 'pending', sent_at = NULL"
                " WHERE created >= ? AND state = 'sent'",
                (stamp,),
            )
            return cur.rowcount

    # -- reading ---------------------------------------------------------------------------

    def pending(self, limit: int = 100) -> list[OutboxEntry]:
        """The oldest ``limit`` unsent events, in the order they were added."""
        if limit < 1:
            raise ConfigError(f"limit must be >= 1. Got {limit} instead.", key="limit")
        return self._select("WHERE state = 'pending' ORDER BY seq LIMIT ?", (limit,))

    def entries(self, state: str | None = None) -> list[OutboxEntry]:
        """All events (or those in ``state``), in the order they were added."""
        if state is None:
            return self._select("ORDER BY seq", ())
        if state not in STATES:
            raise ConfigError(
                f"unknown event state {state!r}; known states: {', '.join(STATES)}", key="state"
            )
        return self._select("WHERE state = ? ORDER BY seq", (state,))

    def get(self, event_id: str) -> OutboxEntry | None:
        """The event with this id, or None."""
        found = self._select("WHERE event_id = ?", (event_id,))
        return found[0] if found else None

    def counts(self) -> dict[str, int]:
        """Number of events per state (every state present, zero included)."""
        with self._read("counts") as conn:
            rows = conn.execute("SELECT state, count(*) FROM events GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | dict(rows)

    def has_file(self, key: str) -> bool:
        """Whether an event for this destination path is already recorded (any state)."""
        with self._read("has_file") as conn:
            row = conn.execute("SELECT 1 FROM events WHERE key = ? LIMIT 1", (key,)).fetchone()
        return row is not None

    def close(self) -> None:
        """Close the database connection (safe to call twice)."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with self._translate("close"):
                    conn.close()

    # -- internals -------------------------------------------------------------------------

    def _connect(self, timeout: float) -> sqlite3.Connection:
        if self._readonly:
            if not self._path.is_file():
                raise EventError("no event outbox here", source=str(self._path))
            uri = self._path.resolve().as_uri() + "?mode=ro"
            return sqlite3.connect(
                uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        self._path.parent.mkdir(parents=True, exist_ok=True)
        return sqlite3.connect(
            self._path, timeout=timeout, isolation_level=None, check_same_thread=False
        )

    def _prepare(self) -> None:
        conn = self._connection()
        if self._readonly:
            conn.execute("PRAGMA query_only = ON")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                raise EventError(
                    "not a calstream event outbox (no events table)", source=str(self._path)
                )
            self._check_version(version)
            return
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise EventError(
                f"cannot use SQLite's WAL journal here (got {mode!r}); "
                "put the spool on a local filesystem",
                source=str(self._path),
            )
        conn.execute("PRAGMA synchronous = FULL")
        with self._write("create") as c:
            self._check_version(c.execute("PRAGMA user_version").fetchone()[0])
            for statement in _SCHEMA:
                c.execute(statement)

    def _check_version(self, version: int) -> None:
        if version > _SCHEMA_VERSION:
            raise EventError(
                f"outbox format {version} is newer than this calstream's ({_SCHEMA_VERSION})",
                source=str(self._path),
            )

    def _select(self, where: str, params: Sequence[Any]) -> list[OutboxEntry]:
        with self._read("read") as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM events {where}", params).fetchall()
        return [_entry(row) for row in rows]

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        with self._lock, self._translate(what):
            yield self._connection()

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE ... COMMIT (synced), ROLLBACK on error."""
        with self._lock, self._translate(what):
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise EventError("the outbox is closed", source=str(self._path))
        return self._conn

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise EventError(f"outbox {what} failed: {exc}", source=str(self._path)) from exc
        except OSError as exc:
            raise EventError(f"outbox {what} failed: {exc}", source=str(self._path)) from exc


def format_entries(entries: Iterable[OutboxEntry], *, verbose: bool = False) -> str:
    """A readable table of outbox entries (for ``calstream events list``).

    Columns: seq, state, created (local time), file size, adler32, path at the destination.
    With ``verbose``, each row is followed by its attempts, errors, headers and full JSON value.
    """
    entries = list(entries)
    if not entries:
        return "no events"
    header = ("SEQ", "STATE", "CREATED", "SIZE", "ADLER32", "PATH")
    rows = [_row(e) for e in entries]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(w) if i in (0, 3) else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ]
        return "  ".join([*out, cells[-1]])

    lines = [line(header)]
    for entry, row in zip(entries, rows, strict=True):
        lines.append(line(row))
        if verbose:
            lines.extend(f"    {text}" if text else "" for text in _details(entry))
    return "\n".join(lines)


def _row(entry: OutboxEntry) -> tuple[str, ...]:
    try:
        record = entry.record()
        size = str(record.get("fileSize", "?"))
        adler32 = str(record.get("calstream", {}).get("checksum", {}).get("adler32", "?"))
    except (ValueError, AttributeError):
        size, adler32 = "?", "?"
    return (str(entry.seq), entry.state, _local_time(entry.created), size, adler32, entry.key)


def _details(entry: OutboxEntry) -> list[str]:
    out = [
        f"event id: {entry.event_id}   attempts: {entry.attempts}"
        + (f"   sent: {_local_time(entry.sent_at)}" if entry.sent_at else "")
    ]
    if entry.last_error:
        out.append(f"last error: {entry.last_error}")
    out.extend(
        f"header {name}: {value.decode('utf-8', 'replace')}" for name, value in entry.headers
    )
    try:
        text = json.dumps(entry.record(), indent=2, ensure_ascii=False)
    except ValueError:
        text = repr(entry.value)
    out.extend(text.splitlines())
    out.append("")
    return out


def _entry(row: Sequence[Any]) -> OutboxEntry:
    seq, event_id, key, value, headers, created, state, sent_at, attempts, last_error = row
    return OutboxEntry(
        seq=seq,
        event_id=event_id,
        key=key,
        value=bytes(value),
        headers=tuple((name, text.encode()) for name, text in json.loads(headers)),
        created=created,
        state=state,
        sent_at=sent_at,
        attempts=attempts,
        last_error=last_error,
    )


def _encode_headers(headers: Iterable[tuple[str, bytes]], *, event_id: str) -> str:
    """Headers as JSON ``[[name, text], ...]``; CloudEvents header values are UTF-8 text."""
    try:
        return json.dumps([[str(name), bytes(value).decode("utf-8")] for name, value in headers])
    except (UnicodeDecodeError, TypeError, ValueError) as exc:
        err = EventError(f"event {event_id}: headers must be (str, UTF-8 bytes) pairs: {exc}")
        err.retriable = False
        raise err from exc


def _utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _local_time(stamp: str) -> str:
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        return str(stamp)
