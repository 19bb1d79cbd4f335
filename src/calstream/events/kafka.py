"""The relay from the outbox to Kafka: publish every storage event at least once, in order.

:class:`KafkaPublisher` is a facade in the shape of aiokafka's producer (``start()``,
``flush()``, ``stop()``, each safe to call twice) around an asyncio loop that runs in its own
thread, so the pipeline's threads never wait for a broker::

    pipeline thread                     publisher thread (asyncio)
    outbox.add(event) ── wake() ──►     pending = outbox.pending(batch_events)   # oldest first
                                        one record batch per partition:
                                        futures = [producer.send_batch(...)]     # acks=all
                                        outbox.mark_sent(acknowledged ids)

An event is marked ``sent`` only after the broker acknowledged it. A failed send leaves it
``pending`` in its place and the relay starts again from the oldest pending event after
``retry_interval``: the events wait, in order, however long the broker is away, with a warning
every ``warn_every`` seconds that gives the backlog. A partition has at most one record batch in
flight, stored or refused as a whole, so no failure lets its later events overtake earlier
ones. Idempotence (``idempotence = "auto"``) is asked for and dropped with one warning when the
broker refuses it (tansu does): then a batch retried inside aiokafka may arrive twice, which
consumers de-duplicate by ``ce_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import DefaultPartitioner

from calstream.config import KafkaConfig
from calstream.errors import EventError, PublishError
from calstream.events.outbox import Outbox, OutboxEntry

__all__ = ["KafkaPublisher", "PublisherStats", "client_kwargs", "translate_kafka_error"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often an idle relay looks for events added by other processes (``events replay``).
POLL_INTERVAL = 1.0
#: How long stopping waits for aiokafka to close its connections.
CLOSE_TIMEOUT = 5.0
#: The producer's own choice of partition for a key (murmur2), so a file keeps its partition.
_PARTITIONER = DefaultPartitioner()


class _QuietReconnects(logging.Filter):
    """Drop aiokafka's error line per failed connection attempt: the relay reports the outage
    itself, with the backlog, every ``warn_every`` seconds instead of every retry."""

    _DROP = ("Unable connect to", "Unexpected error during InitProd", "Unable to update metadata")
    _RETRIED = ("NodeNotReadyError", "KafkaConnectionError", "RequestTimedOutError")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(self._DROP):
            return False
        if message.startswith("Got error produce response"):
            text = record.getMessage()
            return not any(name in text for name in self._RETRIED)
        return True


_QUIET = _QuietReconnects()


class _Stopped(Exception):
    """stop() was called while the relay waited for the broker."""


@dataclass(frozen=True)
class PublisherStats:
    """What a publisher has done: ``published`` events acked by this one, ``pending`` left."""

    published: int
    pending: int
    failed_attempts: int
    connected: bool
    idempotent: bool | None
    last_error: str | None


def client_kwargs(config: KafkaConfig) -> dict[str, Any]:
    """Connection and security keyword arguments for aiokafka clients (producer or consumer).

    The SASL password is read here, from its file or environment variable, and nowhere logged.
    """
    kwargs: dict[str, Any] = {
        "bootstrap_servers": list(config.bootstrap_servers),
        "client_id": config.client_id,
        "request_timeout_ms": config.request_timeout_ms,
        "security_protocol": config.security_protocol,
    }
    if config.security_protocol in ("SSL", "SASL_SSL"):
        context = create_ssl_context(
            cafile=config.ssl_cafile or None,
            certfile=config.ssl_certfile or None,
            keyfile=config.ssl_keyfile or None,
        )
        context.check_hostname = config.ssl_check_hostname
        kwargs["ssl_context"] = context
    if config.security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = config.sasl_mechanism
        kwargs["sasl_plain_username"] = config.sasl_username
        kwargs["sasl_plain_password"] = config.password()
    return kwargs


def translate_kafka_error(exc: BaseException, config: KafkaConfig, what: str) -> PublishError:
    """A Kafka client error as a :class:`PublishError` naming the brokers and the topic."""
    detail = str(exc) or type(exc).__name__
    if type(exc).__name__ not in detail:
        detail = f"{type(exc).__name__}: {detail}"
    err = PublishError(
        f"{what} failed: {detail}",
        source=",".join(config.bootstrap_servers),
        key=config.topic,
    )
    err.retriable = bool(getattr(exc, "retriable", isinstance(exc, OSError | TimeoutError)))
    return err


class KafkaPublisher:
    """Publish a spool's outbox to Kafka from a background thread.

    Parameters
    ----------
    config
        The ``[events.kafka]`` settings (``bootstrap_servers`` must not be empty).
    outbox
        The outbox database file; the publisher opens its own connection to it.
    name
        Prefix of the log lines (the pipeline's name).

    Raises
    ------
    ConfigError
        No bootstrap servers, or a SASL password that cannot be read.
    EventError
        The outbox cannot be opened.
    """

    def __init__(self, config: KafkaConfig, outbox: str | Path, *, name: str = "events") -> None:
        if not config.enabled:
            from calstream.errors import ConfigError

            raise ConfigError("no bootstrap servers: Kafka is off", key="events.kafka")
        client_kwargs(config)  # fail now, not in the thread, if the password cannot be read
        self.config = config
        self.name = name
        self._outbox = Outbox(outbox)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_event: asyncio.Event | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._progress = threading.Condition()
        self._stopped = False
        self._producer: AIOKafkaProducer | None = None
        self._idempotent: bool | None = {"on": True, "off": False}.get(config.idempotence)
        self._published = 0
        self._failed_attempts = 0
        self._last_error: str | None = None
        self._down_since: float | None = None
        self._last_warning = 0.0
        self._crash: BaseException | None = None
        self._last_pending = 0

    def __repr__(self) -> str:
        servers = ",".join(self.config.bootstrap_servers)
        return f"<KafkaPublisher {servers} topic {self.config.topic!r}>"

    def __enter__(self) -> KafkaPublisher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the relay thread; returns at once, whether the broker is there or not."""
        if self._thread is not None or self._stopped:
            return
        for name in ("aiokafka", "aiokafka.client", "aiokafka.producer.sender", "aiokafka.conn"):
            if _QUIET not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_QUIET)
        self._thread = threading.Thread(
            target=self._thread_main, name="calstream-kafka", daemon=True
        )
        self._thread.start()
        self._started.wait()

    def wake(self) -> None:
        """Tell the relay that an event was added (thread-safe, cheap)."""
        loop, event = self._loop, self._wake_event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` s until the outbox has no pending event; returns how many are.

        Returns at once if the relay is not running.
        """
        deadline = time.monotonic() + timeout
        self.wake()
        while True:
            pending = self.pending()
            remaining = deadline - time.monotonic()
            if pending == 0 or remaining <= 0 or not self._running():
                return pending
            with self._progress:
                self._progress.wait(min(remaining, 0.2))

    def stop(self) -> None:
        """Stop the relay (what is not acknowledged stays pending) and close (safe twice)."""
        self._stopped = True
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is not None and loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)
            thread.join(timeout=CLOSE_TIMEOUT + 5.0)
            if thread.is_alive():
                log.warning("%s: the Kafka relay did not stop in time", self.name)
        self._outbox.close()

    # -- state -------------------------------------------------------------------------------

    def pending(self) -> int:
        """Events in the outbox not yet acknowledged by the broker."""
        with contextlib.suppress(EventError):  # closed by stop(): the last count
            self._last_pending = self._outbox.counts()["pending"]
        return self._last_pending

    def stats(self) -> PublisherStats:
        """A snapshot of the publisher's counters (thread-safe)."""
        return PublisherStats(
            published=self._published,
            pending=self.pending(),
            failed_attempts=self._failed_attempts,
            connected=self._producer is not None and self._down_since is None,
            idempotent=self._idempotent,
            last_error=self._last_error,
        )

    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the relay (publisher thread) -----------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        except BaseException as exc:  # a bug: say so loudly; the events stay in the outbox
            self._crash = exc
            log.exception("%s: the Kafka relay failed; events stay in the outbox", self.name)
        finally:
            self._started.set()
            with self._progress:
                self._progress.notify_all()
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._wake_event = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._loop = loop
        self._started.set()
        cfg = self.config
        try:
            while not self._stop_event.is_set():
                batch = self._outbox.pending(limit=cfg.batch_events)
                if not batch:
                    await self._sleep(POLL_INTERVAL)
                    continue
                try:
                    if self._producer is None:
                        await self._connect()
                    await self._publish(batch)
                except PublishError as exc:
                    # a fresh producer next time: new metadata, new connections
                    await self._close_producer()
                    self._failed(batch[0], exc)
                    await self._sleep(cfg.retry_interval)
                finally:
                    with self._progress:
                        self._progress.notify_all()
        except _Stopped:
            pass
        finally:
            await self._close_producer()

    async def _connect(self) -> None:
        """Start a producer; in ``auto`` mode ask for idempotence once, drop it if refused."""
        want = self._idempotent is not False
        producer = self._new_producer(idempotence=want)
        try:
            await self._unless_stopped(producer.start())
        except (KafkaError, OSError) as exc:
            await self._stop_producer(producer)
            if (
                self.config.idempotence == "auto"
                and want
                and not isinstance(exc, KafkaConnectionError | KafkaTimeoutError | OSError)
            ):
                # The broker answered but refused InitProducerId: try without idempotence.
                plain = self._new_producer(idempotence=False)
                try:
                    await self._unless_stopped(plain.start())
                except (KafkaError, OSError) as exc2:
                    await self._stop_producer(plain)
                    raise translate_kafka_error(exc2, self.config, "connecting") from exc2
                log.warning(
                    "%s: Kafka at %s refuses idempotent producers (%s); publishing with "
                    "acks=all without idempotence: a retried batch may arrive twice "
                    "(consumers de-duplicate by ce_id)",
                    self.name, ",".join(self.config.bootstrap_servers),
                    type(exc).__name__,
                )
                self._idempotent = False
                self._producer = plain
                return
            what = "connecting"
            if self.config.idempotence == "on" and not isinstance(
                exc, KafkaConnectionError | KafkaTimeoutError | OSError
            ):
                what = 'connecting with idempotence = "on" (use "auto" for brokers without it)'
            raise translate_kafka_error(exc, self.config, what) from exc
        except _Stopped:
            await self._stop_producer(producer)
            raise
        self._idempotent = want
        self._producer = producer
        log.info(
            "%s: publishing storage events to Kafka %s, topic %s (acks=all%s, %s)",
            self.name, ",".join(self.config.bootstrap_servers), self.config.topic,
            ", idempotent" if want else "", self.config.compression,
        )

    def _new_producer(self, *, idempotence: bool) -> AIOKafkaProducer:
        cfg = self.config
        return AIOKafkaProducer(
            **client_kwargs(cfg),
            acks="all",
            enable_idempotence=idempotence,
            compression_type=None if cfg.compression == "none" else cfg.compression,
            linger_ms=cfg.linger_ms,
            max_batch_size=cfg.max_batch_bytes,
            retry_backoff_ms=min(int(cfg.retry_interval * 1000), 1000),
        )

    async def _publish(self, batch: list[OutboxEntry]) -> None:
        """Send a batch, wait for all acks, mark the acked ones sent; PublishError if any failed.

        One record batch per partition, holding that partition's oldest pending events in
        outbox order (as many as ``max_batch_bytes`` takes; the rest wait for the next round).
        A partition's record batch is stored or refused as a whole, and its next events are
        only sent after it was acknowledged, so a failure can never let later events of a
        partition overtake earlier ones, with or without idempotence.
        """
        producer = self._producer
        if producer is None:
            raise PublishError("no producer", key=self.config.topic)
        topic = self.config.topic

        async def send_all() -> tuple[list[list[OutboxEntry]], list[Any]]:
            try:
                partitions = sorted(await producer.partitions_for(topic))
            except (KafkaError, OSError) as exc:
                return [], [exc]
            builders: dict[int, Any] = {}
            members: dict[int, list[OutboxEntry]] = {}
            full: set[int] = set()
            for entry in batch:
                key = entry.key_bytes()
                partition = _PARTITIONER(key, partitions, partitions)
                if partition in full:
                    continue
                builder = builders.get(partition)
                if builder is None:
                    builder = builders[partition] = producer.create_batch()
                if builder.append(key=key, value=entry.value, timestamp=None,
                                  headers=list(entry.headers)) is None:
                    full.add(partition)  # the rest of this partition waits for the next round
                    continue
                members.setdefault(partition, []).append(entry)
            futures = []
            groups = []
            try:
                for partition, entries in members.items():
                    builders[partition].close()
                    futures.append(
                        await producer.send_batch(builders[partition], topic, partition=partition)
                    )
                    groups.append(entries)
            except (KafkaError, OSError) as exc:
                done = await asyncio.gather(*futures, return_exceptions=True)
                return groups, [*done, exc]
            return groups, await asyncio.gather(*futures, return_exceptions=True)

        groups, results = await self._unless_stopped(send_all())
        acked = [entry.event_id for entries, result in zip(groups, results, strict=False)
                 if not isinstance(result, BaseException) for entry in entries]
        if acked:
            self._published += self._outbox.mark_sent(acked)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            raise translate_kafka_error(failure, self.config, "publishing") from failure
        if self._down_since is not None:
            log.warning(
                "%s: Kafka is back after %.0f s; publishing the waiting events in order",
                self.name, time.monotonic() - self._down_since,
            )
            self._down_since = None
            self._last_error = None

    def _failed(self, oldest: OutboxEntry, exc: PublishError) -> None:
        self._failed_attempts += 1
        self._last_error = str(exc)
        with contextlib.suppress(EventError):
            self._outbox.mark_failed(oldest.event_id, str(exc))
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        if not exc.retriable:  # e.g. an event over the broker's size limit: needs a person
            log.error("%s: %s", self.name, exc)
        if now - self._last_warning >= self.config.warn_every or self._last_warning == 0.0:
            self._last_warning = now
            log.warning(
                "%s: %d storage event(s) wait in the outbox for Kafka (down for %.0f s; "
                "retrying every %.1f s): %s",
                self.name, self.pending(), now - self._down_since,
                self.config.retry_interval, exc,
            )

    # -- helpers --------------------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        """Sleep until woken, stopped, or ``seconds`` passed."""
        if self._wake_event is None or self._stop_event is None:
            raise _Stopped
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake_event.wait(), seconds)
        self._wake_event.clear()
        if self._stop_event.is_set():
            raise _Stopped

    async def _unless_stopped(self, awaitable: Awaitable[T]) -> T:
        """Await, but give up (raise _Stopped) as soon as stop() is called."""
        if self._stop_event is None:
            raise _Stopped
        task = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self._stop_event.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, KafkaError, OSError):
            await task
        raise _Stopped

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await self._stop_producer(producer)

    async def _stop_producer(self, producer: AIOKafkaProducer) -> None:
        with contextlib.suppress(KafkaError, OSError, TimeoutError):
            await asyncio.wait_for(producer.stop(), CLOSE_TIMEOUT)
