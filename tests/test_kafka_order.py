"""The relay keeps each partition's events in outbox order, even after a half-failed round."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from aiokafka.errors import KafkaTimeoutError

from calstream.config import KafkaConfig
from calstream.errors import PublishError
from calstream.events import KafkaPublisher, Outbox
from calstream.events.kafka import _PARTITIONER
from tests.kafka_fixtures import consume
from tests.test_outbox import make_event


class FakeBatch:
    """Takes ``room`` records, like a BatchBuilder that reached max_batch_bytes."""

    def __init__(self, room: int) -> None:
        self.room, self.records = room, []

    def append(self, *, key, value, timestamp, headers):
        if len(self.records) >= self.room:
            return None
        self.records.append(key)
        return object()

    def close(self) -> None:
        pass


class FlakyProducer:
    """A test double of AIOKafkaProducer's batch API: ``fail`` partitions time out once."""

    def __init__(self, partitions: int, room: int, fail: set[int]) -> None:
        self.partitions, self.room, self.fail = partitions, room, set(fail)
        self.log: dict[int, list[bytes]] = {}  # what "arrived", per partition
        self.rounds: list[dict[int, int]] = []

    async def partitions_for(self, topic):
        return set(range(self.partitions))

    def create_batch(self):
        return FakeBatch(self.room)

    async def send_batch(self, batch, topic, *, partition):
        self.rounds[-1][partition] = len(batch.records)
        future = asyncio.get_running_loop().create_future()
        if partition in self.fail:
            self.fail.discard(partition)
            future.set_exception(KafkaTimeoutError())
        else:
            self.log.setdefault(partition, []).extend(batch.records)
            future.set_result(None)
        return future


def test_half_failed_round_cannot_reorder_a_partition(tmp_path: Path):
    path = tmp_path / "outbox.sqlite3"
    events = [make_event(n) for n in range(40)]
    with Outbox(path) as outbox:
        for event in events:
            outbox.add(event)
    publisher = KafkaPublisher(KafkaConfig(bootstrap_servers=("127.0.0.1:9",), topic="t"), path)
    producer = FlakyProducer(partitions=3, room=4, fail={1})
    publisher._producer = producer  # type: ignore[assignment]
    publisher._stop_event = asyncio.Event()

    async def relay() -> None:
        for _ in range(40):
            pending = publisher._outbox.pending(limit=500)
            if not pending:
                return
            producer.rounds.append({})
            with contextlib.suppress(PublishError):
                await publisher._publish(pending)

    asyncio.run(relay())
    publisher._outbox.close()
    assert all(n <= 4 for r in producer.rounds for n in r.values())  # one batch per partition
    assert producer.rounds[0].get(1) and not producer.fail  # partition 1's first batch failed
    assert len(producer.rounds) > 40 // (3 * 4)  # max_batch_bytes cut the rounds short
    expected: dict[int, list[bytes]] = {}
    for event in events:
        key = event.key.encode()
        expected.setdefault(_PARTITIONER(key, [0, 1, 2], [0, 1, 2]), []).append(key)
    assert producer.log == expected  # all of them, each once, each partition in outbox order
    with Outbox(path) as outbox:
        assert outbox.counts() == {"pending": 0, "sent": 40}


@pytest.mark.slow
def test_small_batches_arrive_in_order(kafka_bootstrap, topic, tmp_path: Path):
    """Against the broker: many rounds of one small record batch per partition, in order."""
    path = tmp_path / "outbox.sqlite3"
    events = [make_event(n) for n in range(30)]
    with Outbox(path) as outbox:
        for event in events:
            outbox.add(event)
    config = KafkaConfig(bootstrap_servers=(kafka_bootstrap,), topic=topic, max_batch_bytes=2048,
                         retry_interval=0.2)
    with KafkaPublisher(config, path) as publisher:
        assert publisher.flush(20.0) == 0
    messages = consume(kafka_bootstrap, topic, 30)
    order = {e.id: i for i, e in enumerate(events)}
    by_partition: dict[int, list[int]] = {}
    for m in messages:
        by_partition.setdefault(m.partition, []).append(order[dict(m.headers)["ce_id"].decode()])
    assert sorted(i for seq in by_partition.values() for i in seq) == list(range(30))
    assert all(seq == sorted(seq) for seq in by_partition.values())
