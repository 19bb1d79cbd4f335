"""Bench helpers: record bytes per benchmark and print throughput (GB/s) and ratios at the end.

pytest-benchmark reports seconds; targets are ratios (kernel vs a memory copy of the same
bytes, two threads vs one), so this prints them in one table after the run.
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


@pytest.fixture(scope="session")
def rates() -> RateRecorder:
    return RateRecorder()


def pytest_terminal_summary(terminalreporter) -> None:
    if not _RESULTS:
        return
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
