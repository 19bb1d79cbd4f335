"""Files the destination refused, waiting to be tried again while the run goes on.

The storers put a file here when storing it failed, and take it back once its back-off has
passed (``output.retry_unstored`` seconds) or as soon as the destination takes another file
(it is back: no need to wait; not for a file it refused outright, e.g. with 403). At the end of
a run each file gets one last attempt, but only when the destination took a file after that one
failed; the rest stay in the spool for the next start, as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["RetryQueue"]

T = TypeVar("T")


@dataclass
class _Waiting(Generic[T]):
    item: T
    due: float
    failed_at: float
    attempts: int
    transient: bool


class RetryQueue(Generic[T]):
    """Thread-safe: items keyed by name, each with the time it may be tried again.

    Parameters
    ----------
    interval
        Seconds between a failure and the next attempt.
    clock
        Monotonic seconds (a parameter for the unit tests).
    """

    def __init__(self, interval: float, clock: Callable[[], float] | None = None) -> None:
        self.interval = interval
        self._clock = clock or time.monotonic
        self._waiting: dict[str, _Waiting[T]] = {}
        self._last_ok = float("-inf")
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)

    def failed(self, key: str, item: T, attempts: int, *, transient: bool = True) -> float:
        """Record a failed attempt (the ``attempts``-th); returns when it is due again.

        ``transient``: the failure was the destination's trouble (down, 5xx, too slow), so
        that :meth:`stored` makes the item due at once; a refusal (401/403, a different file
        there) waits for its interval.
        """
        now = self._clock()
        with self._lock:
            self._waiting[key] = _Waiting(item, now + self.interval, now, attempts, transient)
        return now + self.interval

    def stored(self) -> None:
        """The destination took a file: what failed before for its trouble is due now."""
        now = self._clock()
        with self._lock:
            self._last_ok = now
            for waiting in self._waiting.values():
                if waiting.transient:
                    waiting.due = min(waiting.due, now)

    def take_due(self) -> tuple[T, int] | None:
        """The longest-waiting due item and its attempts so far (removed), or None."""
        now = self._clock()
        with self._lock:
            due = [(w.due, k) for k, w in self._waiting.items() if w.due <= now]
            if not due:
                return None
            waiting = self._waiting.pop(min(due)[1])
            return waiting.item, waiting.attempts

    def take_final(self) -> tuple[T, int] | None:
        """An item that failed before the destination last took a file (removed), or None."""
        with self._lock:
            for key, waiting in self._waiting.items():
                if waiting.failed_at < self._last_ok:
                    del self._waiting[key]
                    return waiting.item, waiting.attempts
        return None

    def drain(self) -> list[tuple[T, int]]:
        """Everything still waiting (removed)."""
        with self._lock:
            items = [(w.item, w.attempts) for w in self._waiting.values()]
            self._waiting.clear()
        return items
