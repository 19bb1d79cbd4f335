"""A bounded queue between two pipeline stages, with an overflow policy and a close.

:class:`StageQueue` holds at most ``maxsize`` items. When it is full, :meth:`~StageQueue.put`
follows the policy:

``block``
    wait for room (back-pressure: the receiver stops reading, ZeroMQ's high-water mark then
    holds the sender back);
``drop-newest``
    refuse the new item;
``drop-oldest``
    discard the oldest waiting item and take the new one.

Every dropped item is handed to ``on_drop`` (which counts and logs it with its train id), so a
drop is never silent. :meth:`~StageQueue.get` numbers the items it hands out 0, 1, 2, … in the
order they leave the queue: whatever was dropped before, the numbers stay contiguous, which is
what the writer needs to put trains back in order. :meth:`~StageQueue.close` lets consumers
drain what is left and then see :data:`CLOSED`, without a sentinel that would use up a number.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

__all__ = ["CLOSED", "OVERFLOW_POLICIES", "StageQueue"]

T = TypeVar("T")
Policy = Literal["block", "drop-oldest", "drop-newest"]
OVERFLOW_POLICIES: tuple[str, ...] = ("block", "drop-oldest", "drop-newest")

CLOSED: Any = object()
"""What :meth:`StageQueue.get` returns once the queue is closed and empty."""


class StageQueue(Generic[T]):
    """A bounded FIFO with an overflow policy, contiguous hand-out numbers and a close.

    Parameters
    ----------
    maxsize
        Items it holds at most.
    policy
        ``"block"``, ``"drop-oldest"`` or ``"drop-newest"``.
    on_drop
        Called (outside the lock) with each dropped item and the reason, ``"queue-full"``.
    """

    def __init__(self, maxsize: int, policy: Policy = "block",
                 on_drop: Callable[[T, str], None] | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1. Got {maxsize} instead.")
        if policy not in OVERFLOW_POLICIES:
            raise ValueError(f"unknown overflow policy {policy!r}; known: "
                             f"{', '.join(OVERFLOW_POLICIES)}")
        self.maxsize = maxsize
        self.policy = policy
        self._on_drop = on_drop
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False
        self._handed_out = 0
        self.high_water = 0
        self.dropped = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def put(self, item: T, timeout: float | None = None) -> bool:
        """Add ``item``, following the policy when full.

        Returns
        -------
        bool
            True when the item is in the queue; False when it was dropped (drop-newest) or,
            with ``block``, the timeout passed first (the item is *not* dropped then: the
            caller still owns it and may try again).

        Raises
        ------
        RuntimeError
            The queue is closed.
        """
        dropped: T | None = None
        accepted = True
        with self._lock:
            if self._closed:
                raise RuntimeError("put() on a closed queue")
            if len(self._items) >= self.maxsize:
                if self.policy == "block":
                    if not self._not_full.wait_for(
                        lambda: len(self._items) < self.maxsize or self._closed, timeout
                    ):
                        return False
                    if self._closed:
                        raise RuntimeError("put() on a closed queue")
                elif self.policy == "drop-newest":
                    dropped, accepted = item, False
                else:
                    dropped = self._items.popleft()
            if accepted:
                self._items.append(item)
                self.high_water = max(self.high_water, len(self._items))
                self._not_empty.notify()
            if dropped is not None:
                self.dropped += 1
        if dropped is not None and self._on_drop is not None:
            self._on_drop(dropped, "queue-full")
        return accepted

    def get(self, timeout: float | None = None) -> tuple[int, T] | Any:
        """The oldest item and its hand-out number, as ``(n, item)``.

        Returns :data:`CLOSED` once the queue is closed and empty, None when ``timeout``
        seconds passed with nothing to take.
        """
        with self._lock:
            if not self._not_empty.wait_for(lambda: self._items or self._closed, timeout):
                return None
            if not self._items:
                return CLOSED
            item = self._items.popleft()
            n = self._handed_out
            self._handed_out += 1
            self._not_full.notify()
            return n, item

    def close(self) -> None:
        """No more puts; consumers drain what is left, then get :data:`CLOSED` (idempotent)."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
