"""Storage events through a real broker (tansu, or CALSTREAM_TEST_KAFKA): publisher rate and delay.

    .venv/bin/pytest bench/test_bench_events.py --benchmark-only -s

* events/s: a backlog of N events in the outbox, published by a fresh :class:`KafkaPublisher`
  (connect, send, wait for every ack, mark sent in SQLite), until the outbox is empty;
* delay: one event recorded every 20 ms the way the store stage does it (``outbox.add`` then
  ``wake()``), and the time until a consumer on the topic has it (stored -> consumed).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from pathlib import Path

import pytest
from tests.kafka_fixtures import EXTERNAL, Tansu
from tests.ports import free_port
from tests.test_outbox import make_event

from calstream.config import KafkaConfig
from calstream.events import KafkaPublisher, Outbox

BACKLOG = 2000
DELAY_EVENTS = 100


@pytest.fixture(scope="module")
def bootstrap():
    if EXTERNAL:
        yield EXTERNAL
        return
    broker = Tansu(free_port()).start()
    yield broker.bootstrap
    broker.stop()


def _filled_outbox(path: Path, n: int) -> Outbox:
    outbox = Outbox(path)
    for i in range(n):
        outbox.add(make_event(i, run=1 + i // 99999))
    return outbox


@pytest.mark.benchmark(group="events")
def test_publisher_events_per_second(benchmark, bootstrap, tmp_path):
    rounds = iter(range(1000))

    def setup():
        i = next(rounds)
        path = tmp_path / f"outbox-{i}.sqlite3"
        _filled_outbox(path, BACKLOG).close()
        config = KafkaConfig(bootstrap_servers=(bootstrap,), topic=f"bench-{uuid.uuid4().hex}")
        return (config, path), {}

    def publish(config, path):
        publisher = KafkaPublisher(config, path, name="bench")
        publisher.start()
        left = publisher.flush(120)
        publisher.stop()
        assert left == 0

    benchmark.pedantic(publish, setup=setup, rounds=3, iterations=1)
    best = benchmark.stats.stats.min
    print(f"\npublisher: {BACKLOG} events in {best:.3f} s = {BACKLOG / best:,.0f} events/s "
          f"(median {BACKLOG / benchmark.stats.stats.median:,.0f} events/s)")


def test_stored_to_consumed_delay(bootstrap, tmp_path):
    from aiokafka import AIOKafkaConsumer

    topic = f"bench-{uuid.uuid4().hex}"
    config = KafkaConfig(bootstrap_servers=(bootstrap,), topic=topic)
    events = [make_event(i) for i in range(DELAY_EVENTS + 1)]
    received: dict[str, float] = {}
    ready = threading.Event()
    done = threading.Event()

    async def consume() -> None:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                    auto_offset_reset="earliest", metadata_max_age_ms=500,
                                    fetch_max_wait_ms=10)
        await consumer.start()
        try:
            while not done.is_set():
                batches = await consumer.getmany(timeout_ms=50)
                now = time.perf_counter()
                for records in batches.values():
                    for msg in records:
                        received[dict(msg.headers)["ce_id"].decode()] = now
                if received:
                    ready.set()
        finally:
            await consumer.stop()

    consumer = threading.Thread(target=lambda: asyncio.run(consume()))
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    publisher = KafkaPublisher(config, outbox.path, name="bench")
    publisher.start()
    try:
        outbox.add(events[0])  # creates the topic; the consumer starts once it exists
        publisher.wake()
        assert publisher.flush(30) == 0
        consumer.start()
        assert ready.wait(30)
        added: dict[str, float] = {}
        for event in events[1:]:
            added[event.id] = time.perf_counter()
            outbox.add(event)
            publisher.wake()
            time.sleep(0.02)
        deadline = time.monotonic() + 30
        while len(received) < len(events) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        done.set()
        consumer.join(timeout=30)
        publisher.stop()
        outbox.close()
    delays = sorted((received[i] - t) * 1e3 for i, t in added.items())
    assert len(delays) == DELAY_EVENTS
    p95 = delays[int(0.95 * len(delays)) - 1]
    print(f"\nstored -> consumed: median {statistics.median(delays):.1f} ms, "
          f"p95 {p95:.1f} ms, max {delays[-1]:.1f} ms over {len(delays)} events")
