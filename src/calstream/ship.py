"""The shipping consumer: copy every announced file to a second site, verified, exactly once.

``calstream ship CONFIG`` joins the Kafka consumer group ``[ship] group_id`` on the storage-event
topic of ``[events.kafka]``. For each event it copies the file from where the event says it is
stored (``calstream.destination``: a ``file://`` path, or a ``davs://``/``https://`` URL read with
a streamed ``GET``) to ``[ship] destination`` (a directory or a WebDAV door) under the same
relative path (``calstream.relpath``), checks the copy's size and Adler-32 against the event and
only then commits the event's offset. So a crash or kill repeats at most the copy in flight, and
an identical copy already there is skipped (at-least-once delivery, idempotent effect). More
``calstream ship`` processes in the same group share the topic's partitions.

A file read from a WebDAV door is streamed into a staging file (``[ship] staging``; by default a
hidden folder in a ``file://`` second site's root, so that storing it is a rename-like hard link,
else the system's temporary directory) while its Adler-32 is computed, checked against the event
(and the door's ``Digest``), then stored like a spool file and the staging file removed.

A message that is not a calstream storage event is skipped with a warning. A copy that fails
is retried ``retries`` times, ``retry_interval`` s apart; then the shipper stops with the error,
its offset uncommitted, so nothing is skipped silently: the next start tries that event again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from calstream.config import KafkaConfig, ShipConfig
from calstream.errors import (
    CalstreamError,
    ChecksumMismatch,
    ConfigError,
    EventError,
    StoreError,
)
from calstream.events.kafka import client_kwargs, translate_kafka_error
from calstream.store import (
    FileDestination,
    WebdavDestination,
    WebdavSettings,
    open_destination,
)

__all__ = ["ShipSummary", "Shipper"]

log = logging.getLogger(__name__)


@dataclass
class ShipSummary:
    """What one shipper did."""

    copied: int = 0
    skipped: int = 0
    ignored: int = 0
    bytes: int = 0
    seconds: float = 0.0
    partitions: set[int] = field(default_factory=set)

    def format(self) -> str:
        rate = self.bytes / max(self.seconds, 1e-9) / 1e6
        return (
            f"shipped  {self.copied} file(s), {self.bytes / 1e9:.3f} GB ({rate:.1f} MB/s) "
            f"in {self.seconds:.1f} s; {self.skipped} already there, "
            f"{self.ignored} message(s) not storage events"
        )


class Shipper:
    """One member of the shipping consumer group.

    Parameters
    ----------
    kafka
        Brokers, topic and security (``[events.kafka]``).
    ship
        Destination and group (``[ship]``).
    name
        Prefix of the log lines.

    Raises
    ------
    ConfigError
        No brokers or no destination.
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        ship: ShipConfig,
        *,
        source: WebdavSettings | None = None,
        name: str = "ship",
    ) -> None:
        if not kafka.enabled:
            raise ConfigError("ship needs Kafka brokers", key="events.kafka.bootstrap_servers")
        if not ship.destination:
            raise ConfigError("ship needs a destination URL", key="ship.destination")
        self.kafka = kafka
        self.ship = ship
        self.name = name
        try:
            self.destination: Any = open_destination(ship.destination, ship.webdav_settings())
        except ConfigError as exc:
            raise ConfigError(exc.message, key="ship.destination") from None
        # staged downloads may be hard-linked into place: they are our own copies
        self._staged_destination = self.destination
        if isinstance(self.destination, FileDestination):
            # a second site holds a copy of its own, never a hard link to the first site's file
            self.destination = FileDestination(self.destination.root, link=False)
            default_staging = self.destination.root / ".calstream-staging"
        else:
            default_staging = Path(tempfile.gettempdir()) / "calstream-ship"
        self.staging = Path(ship.staging) if ship.staging else default_staging
        self.source_settings = source or WebdavSettings(deadline=ship.store_deadline)
        self._readers: dict[str, WebdavDestination] = {}
        self._readers_lock = threading.Lock()
        self.summary = ShipSummary()
        self.assignment: frozenset[TopicPartition] = frozenset()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Finish the copy in flight, commit it and leave the group (thread-safe)."""
        self._stop.set()

    def run(self) -> ShipSummary:
        """Consume until :meth:`stop` (or ``idle_timeout`` quiet seconds); returns the summary.

        Raises
        ------
        PublishError
            The broker cannot be reached or refuses us.
        StoreError
            A file could not be shipped after all retries (its offset is not committed).
        """
        t0 = time.monotonic()
        try:
            asyncio.run(self._main())
        finally:
            self.summary.seconds = time.monotonic() - t0
            self.close()
        return self.summary

    async def _main(self) -> None:
        cfg = self.ship
        consumer = AIOKafkaConsumer(
            self.kafka.topic,
            **client_kwargs(self.kafka),
            group_id=cfg.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if cfg.from_beginning else "latest",
            metadata_max_age_ms=5000,
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise translate_kafka_error(exc, self.kafka, "joining the shipping group") from exc
        log.info(
            "%s: shipping %s to %s as group %s", self.name, self.kafka.topic,
            self.destination.url, cfg.group_id,
        )
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        resumed: set[TopicPartition] = set()  # partitions whose first event was looked at
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=200)
                self.assignment = frozenset(consumer.assignment())
                resumed &= self.assignment  # one lost and regained is resumed again
                if not batches:
                    if cfg.idle_timeout and loop.time() - quiet_since > cfg.idle_timeout:
                        log.info("%s: no events for %.1f s, stopping", self.name, cfg.idle_timeout)
                        break
                    continue
                quiet_since = loop.time()
                for tp, records in batches.items():
                    for msg in records:
                        if tp not in resumed:
                            # the first event after a start or a rebalance may be one whose
                            # copy an earlier shipper was killed in the middle of
                            resumed.add(tp)
                            await asyncio.to_thread(self._remove_stale_parts, msg.value)
                        await self._ship_with_retries(msg.value, msg.partition, msg.offset)
                        try:
                            await consumer.commit({tp: msg.offset + 1})
                        except KafkaError as exc:
                            # partition taken away in a rebalance: its new owner gets the rest
                            # (and skips this copy, which is already there)
                            log.warning("%s: commit of %s@%d failed: %s",
                                        self.name, tp, msg.offset, exc)
                            break
                        self.summary.partitions.add(tp.partition)
        except KafkaError as exc:
            raise translate_kafka_error(exc, self.kafka, "consuming") from exc
        finally:
            await consumer.stop()

    async def _ship_with_retries(self, value: bytes, partition: int, offset: int) -> None:
        attempt = 0
        while True:
            try:
                await asyncio.to_thread(self._ship_one, value)
                return
            except (StoreError, EventError) as exc:
                attempt += 1
                if not exc.retriable or attempt > self.ship.retries or self._stop.is_set():
                    log.error("%s: event at partition %d offset %d not shipped: %s",
                              self.name, partition, offset, exc)
                    raise
                log.warning("%s: shipping failed (attempt %d of %d), retrying in %.1f s: %s",
                            self.name, attempt, self.ship.retries + 1,
                            self.ship.retry_interval, exc)
                await asyncio.sleep(self.ship.retry_interval)

    def _ship_one(self, value: bytes) -> None:
        """Copy one event's file and verify it (runs in a worker thread)."""
        event = _parse(value)
        if event is None:
            self.summary.ignored += 1
            log.warning("%s: not a calstream storage event, skipped: %r", self.name, value[:80])
            return
        source, relpath, size, adler32 = event
        if self.destination.has_copy(relpath, size, adler32):
            self.summary.skipped += 1
            log.info("%s: %s is already there", self.name, self.destination.target(relpath))
            return
        if isinstance(source, Path):
            stored = self.destination.store(source, relpath)
        else:
            staged = self._fetch(source, relpath, size, adler32)
            try:
                stored = self._staged_destination.store(staged, relpath)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(staged)
        if stored.size != size or stored.adler32 != adler32:
            self.destination.remove(relpath)  # never leave a copy that differs from the event
            err = ChecksumMismatch(
                f"copy of {source} has {stored.size} bytes, adler32 {stored.adler32}; the event "
                f"says {size} bytes, adler32 {adler32}",
                key=relpath,
            )
            err.retriable = False  # the source itself differs from what was announced
            raise err
        self.summary.copied += 1
        self.summary.bytes += stored.size
        log.info("%s: shipped %s (%.1f MB, adler32 %s)", self.name, stored.url,
                 stored.size / 1e6, stored.adler32)

    def _remove_stale_parts(self, value: bytes) -> None:
        """Delete the hidden partial copies of this event's file at the destination."""
        try:
            event = _parse(value)
            if event is None:
                return
            folder, _, name = event[1].rpartition("/")
            removed = self.destination.remove_stale_parts(folder, lambda n: n == name)
        except CalstreamError as exc:  # shipping this event will say what is wrong
            log.debug("%s: no look for partial copies: %s", self.name, exc)
            return
        if removed:
            log.warning("%s: removed partial copies an earlier shipper left: %s",
                        self.name, ", ".join(removed))

    def _fetch(self, url: str, relpath: str, size: int, adler32: str) -> Path:
        """Stream ``url`` into a staging file, verified against the event; returns its path."""
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create staging folder {self.staging}: {exc.strerror}",
                             key="ship.staging") from exc
        staged = self.staging / f"{PurePosixPath(relpath).name}.{secrets.token_hex(4)}"
        try:
            with open(staged, "xb") as out:
                nbytes, ours, theirs = self._reader(url).download(url, out)
            if nbytes != size or ours != adler32 or (theirs is not None and theirs != ours):
                door = f", the door reports adler32 {theirs}" if theirs else ""
                raise ChecksumMismatch(
                    f"{url} arrived with {nbytes} bytes, adler32 {ours}{door}; the event says "
                    f"{size} bytes, adler32 {adler32}",
                    key=relpath,
                )  # retriable: it may have been spoilt on the way
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise
        return staged

    def _reader(self, url: str) -> WebdavDestination:
        """A WebDAV client for the door ``url`` is on (one per door, kept)."""
        parts = urlsplit(url)
        door = f"{parts.scheme}://{parts.netloc}"
        with self._readers_lock:
            reader = self._readers.get(door)
            if reader is None:
                try:
                    reader = WebdavDestination(door, self.source_settings)
                except ConfigError as exc:
                    err = StoreError(f"cannot read {url}: {exc.message}", retriable=False)
                    raise err from None
                self._readers[door] = reader
        return reader

    def close(self) -> None:
        """Close the HTTP connections of the doors read from and written to."""
        with self._readers_lock:
            readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            reader.close()
        close = getattr(self.destination, "close", None)
        if close is not None:
            close()


def _parse(value: bytes) -> tuple[Path | str, str, int, str] | None:
    """(source path or URL, relpath, size, adler32) of a storage event; None if it is not one."""
    try:
        record: Any = json.loads(value)
        ours = record["calstream"]
        url, relpath = str(ours["destination"]), str(ours["relpath"])
        size, adler32 = int(record["fileSize"]), str(ours["checksum"]["adler32"]).lower()
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("https", "http", "davs", "dav"):
        web = {"davs": "https", "dav": "http"}.get(scheme, scheme)
        return f"{web}://{rest}", relpath, size, adler32
    if not sep or scheme != "file":
        err = StoreError(
            f"cannot ship from {url!r}: sources must be file://, davs:// or https://",
            key=relpath,
        )
        err.retriable = False
        raise err
    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    return Path(rest), relpath, size, adler32
