"""Bench helpers: record bytes per benchmark and print throughput (GB/s) and ratios at the end.

pytest-benchmark reports seconds, one table per group (the stage: memory, decode, calibrate,
compress, write, store, events); targets are ratios (kernel vs a memory copy of the same
bytes, two threads vs one), so this also prints GB/s in one table after the run, in the order
of the stages.

Compare two runs (saved under ``.benchmarks/``)::

    .venv/bin/pytest bench --benchmark-only --benchmark-autosave     # run 0001, 0002, ...
    .venv/bin/pytest bench --benchmark-only --benchmark-compare      # against the last saved
    .venv/bin/pytest-benchmark compare 0001 0002 --group-by=group    # two saved runs
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass
class Rate:
    label: str
    nbytes: int
    min_s: float
    median_s: float
    copy: str = "memory copy, same bytes"  # label of the copy of the same bytes
    reference: str | None = None  # label of the NumPy reference on the same data

    @property
    def gbps(self) -> float:
        return self.nbytes / self.min_s / 1e9

    @property
    def gbps_median(self) -> float:
        return self.nbytes / self.median_s / 1e9


_RESULTS: dict[str, Rate] = {}


class RateRecorder:
    """``rates.add(label, nbytes, benchmark)`` after a benchmark ran."""

    def add(
        self,
        label: str,
        nbytes: int,
        benchmark,
        *,
        copy: str = "memory copy, same bytes",
        reference: str | None = None,
    ) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable
            return
        _RESULTS[label] = Rate(
            label, nbytes, stats.stats.min, stats.stats.median, copy=copy, reference=reference
        )


_GROUPS: dict[str, str] = {}  # label -> the benchmark's group (its stage)
_STAGE_ORDER = ("memory", "decode", "calibrate", "compress", "write", "store (webdav)", "events")


class _GroupedRecorder(RateRecorder):
    """Also remembers each label's benchmark group, so the summary lists stage by stage."""

    def add(self, label: str, nbytes: int, benchmark, **kwargs) -> None:
        super().add(label, nbytes, benchmark, **kwargs)
        _GROUPS[label] = getattr(benchmark, "group", None) or ""


def _sort_by_stage() -> None:
    def key(label: str) -> int:
        group = _GROUPS.get(label, "")
        return _STAGE_ORDER.index(group) if group in _STAGE_ORDER else len(_STAGE_ORDER)

    ordered = sorted(_RESULTS, key=key)  # stable: within a stage, in the order they ran
    for label in ordered:
        _RESULTS[label] = _RESULTS.pop(label)


@pytest.fixture(scope="session")
def rates() -> RateRecorder:
    return _GroupedRecorder()


def pytest_terminal_summary(terminalreporter) -> None:
    if not _RESULTS:
        return
    _sort_by_stage()
    write = terminalreporter.write_line
    write("")
    write("throughput of raw input (GB/s, from the fastest round; median in brackets)")
    write(f"{'benchmark':58s} {'GB/s':>14s} {'x copy':>7s} {'x numpy':>8s} {'x 1 thread':>10s}")
    for label, rate in _RESULTS.items():
        copy = _RESULTS.get(rate.copy)
        ratio = f"{rate.gbps / copy.gbps:7.3f}" if copy and rate is not copy else " " * 7
        ref = _RESULTS.get(rate.reference) if rate.reference else None
        vs_ref = f"{rate.gbps / ref.gbps:8.1f}" if ref and ref is not rate else " " * 8
        scaling = " " * 10
        if label.endswith(", 2 threads"):
            one = _RESULTS.get(label.removesuffix(", 2 threads") + ", 1 thread")
            if one:
                scaling = f"{rate.gbps / one.gbps:10.2f}"
        write(
            f"{label:58s} {rate.gbps:6.2f} [{rate.gbps_median:5.2f}] {ratio} {vs_ref} {scaling}"
        )
