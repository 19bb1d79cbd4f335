"""The shipping consumer: copy every announced file to a second site, verified, exactly once.

``calstream ship CONFIG`` joins the Kafka consumer group ``[ship] group_id`` on the storage-event
topic of ``[events.kafka]``. For each event it copies the file from where the event says it is
stored (``calstream.destination``, a ``file://`` URL) to ``[ship] destination`` under the same
relative path (``calstream.relpath``), checks the copy's size and Adler-32 against the event and
only then commits the event's offset. So a crash or kill repeats at most the copy in flight, and
an identical copy already there is skipped (at-least-once delivery, idempotent effect). More
``calstream ship`` processes in the same group share the topic's partitions.

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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from calstream.config import KafkaConfig, ShipConfig
from calstream.errors import ChecksumMismatch, ConfigError, EventError, StoreError
from calstream.events.kafka import client_kwargs, translate_kafka_error
from calstream.store import FileDestination, adler32_file, open_destination

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

    def __init__(self, kafka: KafkaConfig, ship: ShipConfig, *, name: str = "ship") -> None:
        if not kafka.enabled:
            raise ConfigError("ship needs Kafka brokers", key="events.kafka.bootstrap_servers")
        if not ship.destination:
            raise ConfigError("ship needs a destination URL", key="ship.destination")
        self.kafka = kafka
        self.ship = ship
        self.name = name
        self.destination = open_destination(ship.destination)
        if isinstance(self.destination, FileDestination):
            # a second site holds a copy of its own, never a hard link to the first site's file
            self.destination = FileDestination(self.destination.root, link=False)
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
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=200)
                self.assignment = frozenset(consumer.assignment())
                if not batches:
                    if cfg.idle_timeout and loop.time() - quiet_since > cfg.idle_timeout:
                        log.info("%s: no events for %.1f s, stopping", self.name, cfg.idle_timeout)
                        break
                    continue
                quiet_since = loop.time()
                for tp, records in batches.items():
                    for msg in records:
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
        target = getattr(self.destination, "target", None)
        if target is not None:
            path = target(relpath)
            if path.is_file() and path.stat().st_size == size and adler32_file(path) == adler32:
                self.summary.skipped += 1
                log.info("%s: %s is already there", self.name, path)
                return
        stored = self.destination.store(source, relpath)
        if stored.size != size or stored.adler32 != adler32:
            if target is not None:  # never leave a copy that differs from the event
                with contextlib.suppress(OSError):
                    os.unlink(target(relpath))
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


def _parse(value: bytes) -> tuple[Path, str, int, str] | None:
    """(source path, relpath, size, adler32) of a storage event; None if it is not one."""
    try:
        record: Any = json.loads(value)
        ours = record["calstream"]
        url, relpath = str(ours["destination"]), str(ours["relpath"])
        size, adler32 = int(record["fileSize"]), str(ours["checksum"]["adler32"])
    except (ValueError, KeyError, TypeError):
        return None
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "file":
        err = StoreError(f"cannot ship from {url!r}: only file:// sources are supported",
                         key=relpath)
        err.retriable = False
        raise err
    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    return Path(rest), relpath, size, adler32
