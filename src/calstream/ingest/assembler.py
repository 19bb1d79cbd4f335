"""Group module data arriving from one or more endpoints into whole trains.

A detector's modules may come from several Karabo Bridge endpoints, each sending one message
per train with some of the sources. :class:`TrainAssembler` collects the parts of a train by
train id and hands trains on **in train-id order** as soon as

* every expected source has arrived, or
* every endpoint has already sent this train or a later one (nothing more can come: with one
  endpoint this is true at once), or
* ``timeout`` seconds have passed since its first part (the endpoint is late or lost it), or
* more than ``max_pending`` trains are waiting (memory stays bounded whatever the input).

A train handed on with sources missing is written with what arrived; the writer records the
gap (INDEX count 0). Parts that can no longer be used are returned as :class:`Rejection`:
a train id at or below the last one handed on (``backwards``), a jump far ahead of the stream
(``jump``, see ``max_jump``), a source sent twice for a train (``duplicate``) and sources
nobody configured (``unknown-source``, never written anywhere).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AssembledTrain", "Rejection", "TrainAssembler"]


@dataclass
class AssembledTrain:
    """One train's data from the expected sources that delivered it."""

    train_id: int
    data: dict[str, dict[str, Any]]
    metadata: dict[str, dict[str, Any]]
    first_seen: float
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rejection:
    """A part of the stream the assembler could not use, and why."""

    reason: str
    train_id: int
    sources: tuple[str, ...]
    detail: str = ""


@dataclass
class _Pending:
    train: AssembledTrain
    endpoints: set[int] = field(default_factory=set)


class TrainAssembler:
    """Collect per-endpoint parts into trains (single-threaded: one owner calls it).

    Parameters
    ----------
    expected
        Source names that make a train complete.
    n_endpoints
        How many endpoints feed it (numbered from 0 in :meth:`add`).
    timeout
        Seconds a train waits for its missing sources.
    max_pending
        Trains held at most; beyond it the oldest is handed on incomplete.
    floor
        Highest train id already written (a restarted run): only later trains are accepted.
    max_jump
        A train id more than this ahead of the newest one seen is rejected as ``jump``,
        unless the next train confirms it (the stream really moved on); 0 accepts any jump.
    """

    def __init__(self, expected: Collection[str], *, n_endpoints: int = 1,
                 timeout: float = 1.0, max_pending: int = 16, floor: int = 0,
                 max_jump: int = 0) -> None:
        self.expected = frozenset(expected)
        self.n_endpoints = n_endpoints
        self.timeout = timeout
        self.max_pending = max(1, max_pending)
        self.max_jump = max_jump
        self.last_emitted = floor
        self._newest: int | None = None
        self._jump_candidate: int | None = None
        self._endpoint_newest = [0] * n_endpoints
        self._pending: dict[int, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, endpoint: int, train_id: int, data: Mapping[str, dict[str, Any]],
            metadata: Mapping[str, dict[str, Any]], now: float,
            ) -> tuple[list[AssembledTrain], list[Rejection]]:
        """Add one message's sources; return the trains now ready and what was rejected."""
        rejected: list[Rejection] = []
        unknown = tuple(sorted(set(data) - self.expected))
        if unknown:
            rejected.append(Rejection("unknown-source", train_id, unknown,
                                      "not a configured module source; ignored"))
        wanted = {src: values for src, values in data.items() if src in self.expected}
        self._endpoint_newest[endpoint] = max(self._endpoint_newest[endpoint], train_id)
        if train_id <= self.last_emitted:
            if wanted:
                rejected.append(Rejection(
                    "backwards", train_id, tuple(sorted(wanted)),
                    f"train ids must increase (last handed on {self.last_emitted})"))
            return self._ready(now), rejected
        if train_id not in self._pending and self._is_wild_jump(train_id):
            rejected.append(Rejection(
                "jump", train_id, tuple(sorted(wanted or data)),
                f"more than {self.max_jump} ahead of train {self._newest}; accepted only "
                "once the next train confirms it"))
            return self._ready(now), rejected
        self._newest = max(self._newest or 0, train_id)
        if wanted:
            pending = self._pending.get(train_id)
            if pending is None:
                pending = self._pending[train_id] = _Pending(
                    AssembledTrain(train_id, {}, {}, now))
            pending.endpoints.add(endpoint)
            for src, values in wanted.items():
                if src in pending.train.data:
                    rejected.append(Rejection("duplicate", train_id, (src,),
                                              "source sent twice for this train; kept the first"))
                    continue
                pending.train.data[src] = values
                if src in metadata:
                    pending.train.metadata[src] = metadata[src]
        return self._ready(now), rejected

    def _is_wild_jump(self, train_id: int) -> bool:
        if not self.max_jump or self._newest is None or train_id - self._newest <= self.max_jump:
            self._jump_candidate = None
            return False
        candidate, self._jump_candidate = self._jump_candidate, train_id
        if candidate is not None and 0 < train_id - candidate <= self.max_jump:
            self._jump_candidate = None
            return False  # two trains agree: the stream moved on
        return True

    def expire(self, now: float) -> list[AssembledTrain]:
        """Trains ready by now (timeouts); call it regularly, also when nothing arrives."""
        return self._ready(now)

    def flush(self) -> list[AssembledTrain]:
        """Every waiting train, in order, as it is (at the end of a run)."""
        return self._ready(float("inf"), everything=True)

    def _ready(self, now: float, everything: bool = False) -> list[AssembledTrain]:
        out: list[AssembledTrain] = []
        while self._pending:
            oldest = min(self._pending)
            pending = self._pending[oldest]
            train = pending.train
            complete = self.expected <= train.data.keys()
            passed = all(newest >= oldest for newest in self._endpoint_newest)
            if not (everything or complete or passed
                    or now - train.first_seen >= self.timeout
                    or len(self._pending) > self.max_pending):
                break
            del self._pending[oldest]
            train.missing = tuple(sorted(self.expected - train.data.keys()))
            self.last_emitted = oldest
            out.append(train)
        return out
