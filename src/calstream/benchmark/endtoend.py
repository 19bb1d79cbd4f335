"""End to end: a real :class:`~calstream.pipeline.Pipeline` fed by the bench sender process.

:class:`EndToEnd` runs the pipeline in a thread of this process, samples its counters four
times a second, and drives the sender (:class:`~calstream.benchmark.sender.SenderProcess`)
through steps of fixed rate:

* :meth:`ramp`: rates rising geometrically until a step is not kept up with, then a few
  bisection steps between the last good and the first bad rate. A step is kept up with when
  nothing was dropped (the bench runs with ``pipeline.overflow = "drop-newest"``), the sender
  was never held back by ZeroMQ (it reached 95 % of its rate) and trains were written at 90 %
  of the offered rate or more over the second half of the step, give or take one train (a
  growing backlog shows there long before the queues overflow).
* :meth:`fixed`: one step at a given rate, keeping every train's latency (first part received
  to chunks written) and busy time per stage, and the CPU time of this process per GB.

Stored files are deleted from the destination as they appear (unless ``keep_files``), so that
minutes of float32 output fit in tmpfs.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calstream.benchmark.sender import SenderProcess, StepResult
from calstream.errors import CalstreamError
from calstream.metrics import RunSummary, Stats

__all__ = ["EndToEnd", "RecordingStats", "Sample", "StepReport"]

log = logging.getLogger(__name__)

_SAMPLE_S = 0.25
_PIXELS = 512 * 1024
_CORRECTED_BYTES_PER_PIXEL = 4 + 1 + 4  # float32 data, uint8 gain, uint32 mask


class RecordingStats(Stats):
    """:class:`~calstream.metrics.Stats` that also keeps every observation with its time.

    The histograms' buckets are too coarse for p99; the bench needs each train's latency.
    """

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[tuple[float, str, str, float]] = []  # (t, name, stage, seconds)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        super().observe(name, seconds, **labels)
        self.samples.append((time.monotonic(), name, labels.get("stage", ""), seconds))


@dataclass(frozen=True)
class Sample:
    """The pipeline's counters at one moment."""

    t: float
    trains_in: int
    trains_written: int
    bytes_in: int
    dropped: int
    cpu: float


@dataclass
class StepReport:
    """One fixed-rate step: what was offered, what came out, whether it kept up."""

    rate_hz: float
    gbps: float
    trains: int
    sent_hz: float
    written_hz: float
    dropped: int
    kept_up: bool
    cpu_s_per_gb: float
    latencies: list[float] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    start: float = 0.0
    seconds: float = 0.0

    def to_dict(self, with_latencies: bool = False) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "latencies"}
        if with_latencies:
            out["latencies"] = self.latencies
        return out


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class EndToEnd:
    """A pipeline in a thread and the sender process that feeds it.

    Parameters
    ----------
    config
        The pipeline's config: ``source.endpoint`` must be where ``sender`` binds (PULL,
        connect), ``simulate.enabled`` false.
    sender
        The started sender process.
    train_bytes
        Raw bytes of one train (all modules).
    destination_dir
        Local directory of a ``file://`` destination whose stored files may be deleted.
    """

    def __init__(self, config: Any, sender: SenderProcess, train_bytes: int, *,
                 destination_dir: Path | None = None) -> None:
        from calstream.pipeline import Pipeline

        self.config = config
        self.sender = sender
        self.train_bytes = train_bytes
        self.destination_dir = destination_dir
        self.pipeline = Pipeline(config)
        self.stats = RecordingStats()
        self.pipeline.stats = self.stats  # before run(): every thread counts into it
        self.timeline: list[Sample] = []
        self.offered: list[tuple[float, float, float]] = []  # (start, end, trains/s)
        self.summary: RunSummary | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-pipeline", daemon=True)
        self._sampler = threading.Thread(target=self._sample_loop, name="bench-sampler",
                                         daemon=True)
        self.sent = 0

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, warmup_trains: int = 3) -> None:
        """Start the pipeline and the sampler; send a few trains to warm everything up."""
        self._thread.start()
        self._sampler.start()
        self.send(1.0 * max(warmup_trains, 1), warmup_trains)
        self.drain(60.0)
        self.timeline.clear()
        self.offered.clear()

    def stop(self) -> RunSummary:
        """Stop the pipeline (it drains and stores its files) and return its summary."""
        self.pipeline.stop()
        self._thread.join()
        self._done.set()
        self._sampler.join()
        self._clean_destination()
        if self._error is not None:
            raise self._error
        assert self.summary is not None
        return self.summary

    def _run(self) -> None:
        try:
            self.summary = self.pipeline.run()
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def _sample(self) -> Sample:
        s = self.stats.snapshot()
        return Sample(time.monotonic(), int(s.get("trains_in", 0)),
                      int(s.get("trains_written", 0)), int(s.get("bytes_in", 0)),
                      int(s.get("dropped_trains", 0) + s.get("dropped_parts", 0)), _cpu())

    def _sample_loop(self) -> None:
        while not self._done.wait(_SAMPLE_S):
            self.timeline.append(self._sample())
            self._clean_destination()

    def _clean_destination(self) -> None:
        if self.destination_dir is None or not self.destination_dir.exists():
            return
        for path in self.destination_dir.rglob("*.h5"):
            path.unlink(missing_ok=True)

    def _check_alive(self) -> None:
        if self._done.is_set():
            if isinstance(self._error, CalstreamError):
                raise self._error
            raise CalstreamError("the pipeline stopped during the bench") from self._error

    def send(self, rate_hz: float, trains: int) -> StepResult:
        """Have the sender send ``trains`` trains at ``rate_hz`` (0: as fast as it can)."""
        self._check_alive()
        result = self.sender.step(rate_hz, trains)
        self.sent += result.trains
        self.offered.append((result.start, result.start + result.seconds, rate_hz))
        return result

    def drain(self, timeout: float) -> bool:
        """Wait until every train sent so far is written or dropped."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self._sample()
            if s.trains_written + s.dropped >= self.sent:
                return True
            self._check_alive()
            time.sleep(0.05)
        return False

    # -- measurements ---------------------------------------------------------------------

    def fixed(self, rate_hz: float, seconds: float) -> StepReport:
        """One step at ``rate_hz`` for ``seconds``; then wait for the pipeline to catch up."""
        trains = max(3, round(rate_hz * seconds))
        self.drain(30.0)
        first = len(self.stats.samples)
        before = self._sample()
        result = self.send(rate_hz, trains)
        end = self._sample()
        self.drain(max(10.0, 3 * seconds))
        after = self._sample()
        observed = self.stats.samples[first:]
        latencies = [sec for _, name, _, sec in observed if name == "latency_seconds"]
        stages: dict[str, float] = {}
        for _, name, stage, sec in observed:
            if name == "stage_seconds":
                stages[stage] = stages.get(stage, 0.0) + sec
        written = after.trains_written - before.trains_written
        gbytes = (after.bytes_in - before.bytes_in) / 1e9
        dropped = after.dropped - before.dropped
        half = self._written_rate(result.start + result.seconds / 2,
                                  result.start + result.seconds)
        if half is None:  # a step too short to see its second half
            half = written / max(after.t - before.t, 1e-9)
        # One train less in the second half is counting, not falling behind: at low rates a
        # half-step holds only a few trains.
        one_train = 2 / result.seconds if result.seconds > 0 else 0.0
        kept_up = (dropped == 0 and result.achieved_hz >= 0.95 * rate_hz
                   and half >= 0.9 * rate_hz - one_train and end.t > before.t)
        report = StepReport(
            rate_hz=rate_hz, gbps=rate_hz * self.train_bytes / 1e9, trains=result.trains,
            sent_hz=result.achieved_hz, written_hz=half, dropped=dropped, kept_up=kept_up,
            cpu_s_per_gb=(after.cpu - before.cpu) / gbytes if gbytes else 0.0,
            latencies=latencies,
            stage_seconds={k: v / max(written, 1) for k, v in sorted(stages.items())},
            start=result.start, seconds=result.seconds,
        )
        log.info("step %.1f trains/s (%.3f GB/s): sent %.1f/s, written %.1f/s, %d dropped: %s",
                 rate_hz, report.gbps, report.sent_hz, half, dropped,
                 "kept up" if kept_up else "NOT kept up")
        return report

    def _written_rate(self, t0: float, t1: float) -> float | None:
        inside = [s for s in self.timeline if t0 <= s.t <= t1]
        if len(inside) < 2 or inside[-1].t - inside[0].t < 0.5:
            return None
        return (inside[-1].trains_written - inside[0].trains_written) / (
            inside[-1].t - inside[0].t)

    def ramp(self, *, start_hz: float, factor: float, max_hz: float, step_seconds: float,
             refine: int) -> list[StepReport]:
        """Find the highest rate kept up with (see the module docstring)."""
        steps: list[StepReport] = []
        rate = start_hz
        good: float | None = None
        bad: float | None = None
        while rate <= max_hz:
            step = self.fixed(rate, step_seconds)
            steps.append(step)
            if not step.kept_up:
                bad = rate
                break
            good = rate
            rate = round(rate * factor, 2)
        if bad is not None:
            lo = good if good is not None else 0.0
            for _ in range(refine):
                mid = round((lo + bad) / 2, 2)
                if mid <= 0 or bad - mid < 0.05 * bad:
                    break
                step = self.fixed(mid, step_seconds)
                steps.append(step)
                if step.kept_up:
                    lo = mid
                else:
                    bad = mid
        return steps

    def corrected_ratio(self) -> tuple[float, float]:
        """(compression ratio of the corrected data, file bytes per raw byte) so far."""
        s = self.stats.snapshot()
        written = s.get("bytes_written", 0)
        corrected = s.get("frames_written", 0) * _PIXELS * _CORRECTED_BYTES_PER_PIXEL
        raw = s.get("bytes_in", 0)
        return (corrected / written if written else 0.0, written / raw if raw else 0.0)
