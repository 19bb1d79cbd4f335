"""Bench helpers: record bytes per benchmark and print throughput (GB/s) and ratios at the end.

pytest-benchmark reports seconds, one table per group (the stage: memory, decode, calibrate,
compress, write, store, events); targets are ratios (kernel vs a memory copy of the same
bytes, two threads vs one), so this also prints GB/s in one table, by stage, after the run.

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
    group: str
    label: str
    nbytes: int
    min_s: float
    median_s: float

    @property
    def gbps(self) -> float:
        return self.nbytes / self.min_s / 1e9

    @property
    def gbps_median(self) -> float:
        return self.nbytes / self.median_s / 1e9


_RESULTS: dict[str, Rate] = {}


class RateRecorder:
    """``rates.add(label, nbytes, benchmark)`` after a benchmark ran."""

    def add(self, label: str, nbytes: int, benchmark) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable
            return
        group = getattr(benchmark, "group", None) or ""
        _RESULTS[label] = Rate(group, label, nbytes, stats.stats.min, stats.stats.median)


@pytest.fixture(scope="session")
def rates() -> RateRecorder:
    return RateRecorder()


def pytest_terminal_summary(terminalreporter) -> None:
    if not _RESULTS:
        return
    write = terminalreporter.write_line
    copy = _RESULTS.get("memory copy, same bytes")
    write("")
    write("throughput of raw input (GB/s, from the fastest round; median in brackets)")
    write(f"{'benchmark':60s} {'GB/s':>14s} {'x copy':>7s} {'x 1 thread':>10s}")
    order = list(dict.fromkeys(r.group for r in _RESULTS.values()))
    previous = None
    for label, rate in sorted(_RESULTS.items(), key=lambda kv: order.index(kv[1].group)):
        if rate.group != previous:
            write(f"[{rate.group or 'other'}]")
            previous = rate.group
        ratio = f"{rate.gbps / copy.gbps:7.3f}" if copy and rate is not copy else " " * 7
        scaling = " " * 10
        if label.endswith(", 2 threads"):
            one = _RESULTS.get(label.removesuffix(", 2 threads") + ", 1 thread")
            if one:
                scaling = f"{rate.gbps / one.gbps:10.2f}"
        write(f"{label:60s} {rate.gbps:6.2f} [{rate.gbps_median:5.2f}] {ratio} {scaling}")
