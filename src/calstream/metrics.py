"""Counters shared by the pipeline's threads, the Prometheus endpoint, the status line and
the run summary printed at the end.

:class:`Stats` is the one place the pipeline counts things (plain and labelled counters, time
histograms); :class:`MetricsServer` exposes it to Prometheus at scrape time, and
:class:`StatusLine` shows it to the person at the terminal.
"""

from __future__ import annotations

import bisect
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["HISTOGRAM_BUCKETS", "MetricsServer", "RunSummary", "Stats", "StatusLine"]

log = logging.getLogger(__name__)

HISTOGRAM_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
"""Upper bounds (seconds) of the stage-time and latency histograms."""

Labels = tuple[tuple[str, str], ...]


class Stats:
    """Thread-safe named counters (trains, bytes, drops by reason, ...) and histograms."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._labelled: Counter[tuple[str, Labels]] = Counter()
        self._hist: dict[tuple[str, Labels], list[float]] = {}
        self.started = time.monotonic()

    def add(self, name: str, n: int | float = 1, **labels: str) -> None:
        """Add ``n`` to counter ``name``; with labels, to the labelled series as well."""
        with self._lock:
            self._counts[name] += n
            if labels:
                self._labelled[name, tuple(sorted(labels.items()))] += n

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        """Record one duration in histogram ``name`` (buckets: :data:`HISTOGRAM_BUCKETS`)."""
        key = (name, tuple(sorted(labels.items())))
        i = bisect.bisect_left(HISTOGRAM_BUCKETS, seconds)
        with self._lock:
            hist = self._hist.get(key)
            if hist is None:
                # per bucket, then +Inf, then the sum
                hist = self._hist[key] = [0.0] * (len(HISTOGRAM_BUCKETS) + 2)
            hist[i] += 1
            hist[-1] += seconds

    def labelled(self) -> dict[tuple[str, Labels], int | float]:
        """``{(name, labels): value}`` of the labelled counters."""
        with self._lock:
            return dict(self._labelled)

    def histograms(self) -> dict[tuple[str, Labels], list[float]]:
        """``{(name, labels): [count per bucket ..., count above, sum]}`` (not cumulative)."""
        with self._lock:
            return {k: list(v) for k, v in self._hist.items()}

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


# -- Prometheus ------------------------------------------------------------------------------

# counter name in Stats -> (metric name, help); exported as <name>_total
_COUNTERS: dict[str, tuple[str, str]] = {
    "trains_in": ("calstream_trains_in", "Trains accepted from the stream"),
    "bytes_in": ("calstream_bytes_in", "Raw array bytes accepted from the stream"),
    "trains_written": ("calstream_trains_written", "Trains written into files"),
    "train_ids_skipped": ("calstream_train_ids_skipped",
                          "Train ids never seen between accepted trains"),
    "frames_written": ("calstream_frames_written", "Frames written into files"),
    "bytes_written": ("calstream_bytes_written", "Compressed chunk bytes written"),
    "bytes_out": ("calstream_bytes_out", "Bytes of files stored at the destination"),
    "bytes_uncompressed": ("calstream_bytes_corrected", "Corrected bytes before compression"),
    "files_stored": ("calstream_files_stored", "Files stored at the destination"),
    "files_unstored": ("calstream_files_unstored", "Files left in the spool"),
    "store_failures": ("calstream_store_failures",
                       "Attempts to store a file that failed (each retried or left in the spool)"),
    "store_retries": ("calstream_store_retries", "Files tried again after a refusal"),
    "events": ("calstream_events_recorded", "Storage events recorded in the outbox"),
    "preview_sent": ("calstream_preview_trains", "Corrected trains re-published for viewers"),
}
_LABELLED: dict[str, tuple[str, str]] = {
    "source_trains_in": ("calstream_source_trains_in", "Trains with data, per input source"),
    "source_bytes_in": ("calstream_source_bytes_in", "Raw bytes per input source"),
    "source_trains_out": ("calstream_source_trains_out", "Trains written, per output source"),
    "source_bytes_out": ("calstream_source_bytes_out",
                         "Compressed bytes written, per output source"),
    "dropped": ("calstream_dropped", "Trains or parts dropped, by stage and reason"),
    "rejected": ("calstream_rejected", "Malformed or unusable input, by reason"),
}
_HISTOGRAMS: dict[str, tuple[str, str]] = {
    "stage_seconds": ("calstream_stage_seconds", "Busy time per train and stage"),
    "latency_seconds": ("calstream_latency_seconds",
                        "From a train's arrival to its chunks written"),
}


class _Collector:
    """Turns a :class:`Stats` and some gauges into Prometheus metric families at scrape time."""

    def __init__(self, stats: Stats, gauges: Callable[[], Mapping[str, Any]]) -> None:
        self.stats = stats
        self.gauges = gauges

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snap = self.stats.snapshot()
        for key, (name, help_text) in _COUNTERS.items():
            yield CounterMetricFamily(name, help_text, value=snap.get(key, 0))
        labelled = self.stats.labelled()
        for key, (name, help_text) in _LABELLED.items():
            series = [(dict(lbl), v) for (n, lbl), v in labelled.items() if n == key]
            names = sorted({k for lbl, _ in series for k in lbl}) or ["source"]
            family = CounterMetricFamily(name, help_text, labels=names)
            for lbl, value in series:
                family.add_metric([lbl.get(k, "") for k in names], value)
            yield family
        hists = self.stats.histograms()
        for key, (name, help_text) in _HISTOGRAMS.items():
            series = [(dict(lbl), h) for (n, lbl), h in hists.items() if n == key]
            names = sorted({k for lbl, _ in series for k in lbl})
            family = HistogramMetricFamily(name, help_text, labels=names)
            for lbl, h in series:
                cumulative, buckets = 0.0, []
                for bound, count in zip((*HISTOGRAM_BUCKETS, float("inf")), h[:-1], strict=True):
                    cumulative += count
                    buckets.append((_bound(bound), cumulative))
                family.add_metric([lbl.get(k, "") for k in names], buckets, sum_value=h[-1])
            yield family
        for name, value in self.gauges().items():
            if isinstance(value, Mapping):  # {label value: number}, label "queue"
                family = GaugeMetricFamily(f"calstream_{name}", name.replace("_", " "),
                                           labels=["queue"])
                for label, v in value.items():
                    family.add_metric([label], v)
                yield family
            else:
                yield GaugeMetricFamily(f"calstream_{name}", name.replace("_", " "), value=value)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class MetricsServer:
    """A Prometheus HTTP endpoint (``/metrics``) over a :class:`Stats`, in its own thread.

    Parameters
    ----------
    stats
        What to expose.
    gauges
        Called at every scrape: ``{name: value}`` or ``{name: {queue: value}}``
        (queue depths, files and events pending, compression ratio).
    port, host
        Where to listen (port 0 picks a free one; :attr:`port` tells which).
    """

    def __init__(self, stats: Stats, gauges: Callable[[], Mapping[str, Any]], *,
                 port: int, host: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        from .errors import ConfigError

        # A registry of our own: several pipelines in one process must not collide.
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(stats, gauges))  # type: ignore[arg-type]
        try:
            self._server, self._thread = start_http_server(port, addr=host,
                                                           registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
                              key="metrics.port") from None
        self.host = host
        self.port = int(self._server.server_address[1])
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        """Stop serving (safe to call twice)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# -- status line -----------------------------------------------------------------------------

class StatusLine:
    """Rate, latency and backlog for the person watching: a live line on a terminal, else a
    log line every ``log_every`` seconds.

    Parameters
    ----------
    name
        Pipeline name (prefix).
    stats
        Where the numbers come from.
    backlog
        Called for ``(trains waiting, capacity)``.
    mode
        ``"line"`` (carriage-return line on ``stream``), ``"log"``, ``"off"``, or ``"auto"``
        (``line`` when ``stream`` is a terminal).
    """

    def __init__(self, name: str, stats: Stats, backlog: Callable[[], tuple[int, int]], *,
                 mode: str = "auto", log_every: float = 5.0, stream: TextIO | None = None) -> None:
        self.name = name
        self.stats = stats
        self.backlog = backlog
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "line" if getattr(self.stream, "isatty", lambda: False)() else "log"
        self.mode = mode
        self.every = 1.0 if mode == "line" else log_every
        now = time.monotonic()
        self._next = now + self.every
        self._last = (now, 0.0, 0.0, 0.0, 0.0)
        self._shown = False
        self._width = 0

    def tick(self, now: float | None = None) -> None:
        """Show the status if it is due (cheap when it is not)."""
        now = time.monotonic() if now is None else now
        if self.mode == "off" or now < self._next:
            return
        self._next = now + self.every
        text = self.format(now)
        if self.mode == "line":
            # pad to the previous line's length so that no old characters stay behind
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            self.stream.flush()
            self._shown = True
        else:
            log.info("%s", text)

    def format(self, now: float) -> str:
        s = self.stats.snapshot()
        hist = self.stats.histograms().get(("latency_seconds", ()))
        lat_n, lat_sum = (sum(hist[:-1]), hist[-1]) if hist else (0.0, 0.0)
        t0, bytes0, trains0, n0, sum0 = self._last
        bytes_in, trains = float(s.get("bytes_in", 0)), float(s.get("trains_written", 0))
        self._last = (now, bytes_in, trains, lat_n, lat_sum)
        dt = max(now - t0, 1e-9)
        latency = (lat_sum - sum0) / (lat_n - n0) if lat_n > n0 else 0.0
        waiting, capacity = self.backlog()
        dropped = int(sum(v for (n, _), v in self.stats.labelled().items() if n == "dropped"))
        rejected = int(sum(v for (n, _), v in self.stats.labelled().items() if n == "rejected"))
        return (
            f"{self.name}: {int(s.get('trains_in', 0))} in, {int(trains)} written "
            f"({(trains - trains0) / dt:.1f} trains/s, {(bytes_in - bytes0) / dt / 1e9:.2f} GB/s), "
            f"latency {latency * 1e3:.0f} ms, backlog {waiting}/{capacity}, "
            f"{int(s.get('files_stored', 0))} files stored, {dropped} dropped, "
            f"{rejected} rejected"
        )

    def close(self) -> None:
        """End the live line so that what follows starts on a fresh line."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
