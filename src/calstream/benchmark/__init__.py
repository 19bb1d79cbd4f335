"""The bench harness behind ``calstream bench`` (importable from ``bench/``).

- :class:`BenchOptions`, :func:`run_bench`: the whole run (stages alone, baseline, ramp,
  latency at a fixed rate) as a report dict.
- :func:`write_report`, :func:`to_markdown`: JSON, markdown and PNG plots of a report.
- :class:`EndToEnd`, :class:`SenderProcess`: a pipeline fed by a separate sender process, for
  scripts that measure something else end to end (``bench/runtime_bench.py``).
"""

from calstream.benchmark.endtoend import EndToEnd, RecordingStats
from calstream.benchmark.report import to_markdown, write_report
from calstream.benchmark.runner import DEFAULT_ROOT, BenchOptions, bench_config, run_bench
from calstream.benchmark.sender import SenderProcess

__all__ = [
    "DEFAULT_ROOT",
    "BenchOptions",
    "EndToEnd",
    "RecordingStats",
    "SenderProcess",
    "bench_config",
    "run_bench",
    "to_markdown",
    "write_report",
]
