"""Storage events: build them (dCache billing record + CloudEvents headers), keep them durable.

Public names: :class:`EventSettings`, :class:`StorageEvent`, :func:`build_storage_event`,
:func:`storage_event_schema`, :class:`Outbox`, :class:`OutboxEntry`, :func:`format_entries`.
"""

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
    "Outbox",
    "OutboxEntry",
    "StorageEvent",
    "build_storage_event",
    "format_entries",
    "storage_event_schema",
]
