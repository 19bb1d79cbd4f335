"""Storage events: build them (dCache billing record + CloudEvents headers), keep them durable.

Public names: :class:`EventSettings`, :class:`StorageEvent`, :func:`build_storage_event`,
:func:`storage_event_schema`, :class:`Outbox`, :class:`OutboxEntry`, :func:`format_entries`,
:class:`KafkaPublisher` (the relay to Kafka), :func:`client_kwargs`.
"""

from calstream.events.kafka import KafkaPublisher, PublisherStats, client_kwargs
from calstream.events.outbox import OUTBOX_FILENAME, Outbox, OutboxEntry, format_entries
from calstream.events.schema import (
    EventSettings,
    StorageEvent,
    build_storage_event,
    storage_event_schema,
)

__all__ = [
    "OUTBOX_FILENAME",
    "EventSettings",
    "KafkaPublisher",
    "Outbox",
    "OutboxEntry",
    "PublisherStats",
    "StorageEvent",
    "build_storage_event",
    "client_kwargs",
    "format_entries",
    "storage_event_schema",
]
