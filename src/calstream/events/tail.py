"""Read storage events back from Kafka: ``calstream events tail`` prints them as they come."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from calstream.config import KafkaConfig
from calstream.events.kafka import client_kwargs, translate_kafka_error
from calstream.events.outbox import _local_time

__all__ = ["format_message", "tail_events"]


def format_message(
    value: bytes, headers: Any = (), *, partition: int = -1, offset: int = -1,
    verbose: bool = False,
) -> str:
    """One readable line for a storage event message (with ``verbose``, its JSON after it)."""
    head = {name: bytes(v).decode("utf-8", "replace") for name, v in headers or ()}
    try:
        record = json.loads(value)
        ours = record.get("calstream", {})
        when = _local_time(record.get("date", ""))
        size = f"{record.get('fileSize', 0) / 1e6:.1f} MB"
        trains = f"trains {ours.get('first_train')}-{ours.get('last_train')}"
        line = (
            f"{when}  {record.get('billingPath', '?')}  {size}  "
            f"adler32 {ours.get('checksum', {}).get('adler32', '?')}  "
            f"run {ours.get('run')} seq {ours.get('sequence')} {trains}  "
            f"id {head.get('ce_id', ours.get('event_id', '?'))}"
        )
    except (ValueError, AttributeError, TypeError):
        record = None
        line = f"not a storage event: {bytes(value)[:120]!r}"
    if partition >= 0:
        line += f"  [p{partition}@{offset}]"
    if verbose and record is not None:
        line += "\n" + json.dumps(record, indent=2, ensure_ascii=False)
    return line


def tail_events(
    config: KafkaConfig,
    emit: Callable[[str], None],
    *,
    from_beginning: bool = False,
    count: int | None = None,
    idle_timeout: float = 0.0,
    verbose: bool = False,
    stop: threading.Event | None = None,
) -> int:
    """Print events of ``config.topic`` through ``emit`` until ``count``, idle, or ``stop``.

    Reads without a consumer group (commits nothing). Returns how many it printed.

    Raises
    ------
    PublishError
        The broker cannot be reached or refuses us.
    """
    stop = stop or threading.Event()

    async def run() -> int:
        consumer = AIOKafkaConsumer(
            config.topic,
            **client_kwargs(config),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            metadata_max_age_ms=5000,
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise translate_kafka_error(exc, config, "connecting") from exc
        seen = 0
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        try:
            while not stop.is_set() and (count is None or seen < count):
                batches = await consumer.getmany(timeout_ms=200)
                if not batches:
                    if idle_timeout and loop.time() - quiet_since > idle_timeout:
                        break
                    continue
                quiet_since = loop.time()
                for records in batches.values():
                    for msg in records:
                        if count is not None and seen >= count:
                            break
                        emit(format_message(
                            msg.value, msg.headers, partition=msg.partition,
                            offset=msg.offset, verbose=verbose,
                        ))
                        seen += 1
        except KafkaError as exc:
            raise translate_kafka_error(exc, config, "reading") from exc
        finally:
            await consumer.stop()
        return seen

    return asyncio.run(run())
