"""Counters shared by the pipeline's threads, and the run summary printed at the end."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["RunSummary", "Stats"]


class Stats:
    """Thread-safe named counters (trains, bytes, drops by reason, ...)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self.started = time.monotonic()

    def add(self, name: str, n: int | float = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def get(self, name: str) -> int | float:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int | float]:
        with self._lock:
            return dict(self._counts)


@dataclass(frozen=True)
class RunSummary:
    """What one ``calstream run`` did."""

    trains: int
    frames: int
    bytes_in: int
    bytes_out: int
    files: int
    events: int
    seconds: float
    unstored_files: int = 0
    bytes_uncompressed: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    problems: dict[str, int] = field(default_factory=dict)
    events_published: int | None = None  # None: no Kafka configured
    events_pending: int = 0

    @property
    def rate_gbps(self) -> float:
        return self.bytes_in / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def format(self) -> str:
        """A few human-readable lines."""
        ratio = (
            f"{self.bytes_uncompressed / self.bytes_out:.2f}x" if self.bytes_out else "n/a"
        )
        lines = [
            f"trains   {self.trains}  ({self.trains / max(self.seconds, 1e-9):.1f}/s)",
            f"frames   {self.frames}",
            f"in       {self.bytes_in / 1e9:.3f} GB raw",
            f"out      {self.bytes_out / 1e9:.3f} GB in files "
            f"({self.bytes_uncompressed / 1e9:.3f} GB corrected, compressed {ratio})",
            f"files    {self.files} stored" + (
                f", {self.unstored_files} left in the spool" if self.unstored_files else ""
            ),
            f"events   {self.events} recorded" + (
                f", {self.events_published} published to Kafka, {self.events_pending} pending"
                if self.events_published is not None else ""
            ),
            f"rate     {self.rate_gbps:.3f} GB/s raw over {self.seconds:.1f} s",
        ]
        if self.trains and self.stage_seconds:
            lines.append(
                "per train "
                + ", ".join(
                    f"{stage} {sec / self.trains * 1e3:.1f} ms"
                    for stage, sec in self.stage_seconds.items()
                )
                + " (busy time; workers run in parallel)"
            )
        if self.problems:
            lines.append(
                "problems " + ", ".join(f"{k}={v}" for k, v in sorted(self.problems.items()))
            )
        return "\n".join(lines)
