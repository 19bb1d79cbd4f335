"""``calstream bench --quick`` end to end: the report's structure and sanity (not its speed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from calstream.benchmark import to_markdown

STAGES = {"memory copy", "receive + decode", "correct x1", "correct x2", "compress x1",
          "compress x2", "write"}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess,
                                                                  Path, Path]:
    out = tmp_path_factory.mktemp("bench-report")
    # tmpfs when there is one: new pages on this VM's disk are slow (see DESIGN.md §7)
    root = Path(tempfile.mkdtemp(prefix="calstream-bench-test-",
                                 dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    cmd = [sys.executable, "-m", "calstream", "bench", "--quick", "--set",
           "calibration.cells=1", "--set", "pipeline.workers=2", "-o", str(out),
           "--root", str(root)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        data = root / "data"
        leftover = sorted(data.rglob("*.h5")) if data.exists() else []
        shutil.rmtree(root, ignore_errors=True)
    assert not leftover, f"stored files were not cleaned up: {leftover}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out, root


@pytest.mark.slow
def test_bench_quick_writes_a_sane_report(bench_run) -> None:
    proc, out, _ = bench_run
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == STAGES
    for stage in report["stages"].values():
        assert stage["gbps"] > 0 and stage["seconds_per_train"] > 0

    # The ramp went up until a step was not kept up with (or hit the cap), and the sustained
    # rate is the best step that was.
    ramp = report["ramp"]
    assert len(ramp) >= 2
    kept = [s for s in ramp if s["kept_up"]]
    assert kept, ramp
    best = max(kept, key=lambda s: s["rate_hz"])
    sustained = report["sustained"]
    assert sustained["rate_hz"] == best["rate_hz"] and sustained["gbps"] > 0
    assert all(s["dropped"] == 0 for s in kept)
    assert report["sustained"]["capped"] or any(not s["kept_up"] for s in ramp)

    # Latency at half the sustained rate: one value per train, ordered percentiles.
    lat = report["latency"]
    assert lat["rate_hz"] == pytest.approx(0.5 * sustained["rate_hz"], abs=0.01)
    pct = lat["seconds"]
    assert pct["n"] == len(lat["values"]) >= 3
    assert 0 < pct["p50"] <= pct["p90"] <= pct["p99"] <= pct["max"]

    # Bound, baseline and ratios agree with each other.
    candidates = ("receive + decode", "correct x2", "compress x2", "write")
    assert report["bound"]["stage"] == min(candidates, key=lambda k: report["stages"][k]["gbps"])
    ratios = report["ratios"]
    assert ratios["calstream_per_bound"] == pytest.approx(
        sustained["gbps"] / report["bound"]["gbps"])
    assert ratios["calstream_per_baseline"] == pytest.approx(
        sustained["gbps"] / report["baseline"]["gbps"])
    bound = report["bound"]
    assert 0 < bound["shared_cores_gbps"] <= bound["cores"] * report["stages"]["write"]["gbps"]
    assert report["compression"]["ratio"] > 1
    assert sustained["cpu_s_per_gb"] > 0
    assert set(sustained["stage_seconds_per_train"]) >= {"correct", "compress", "write"}

    # Scaling: every target, more nodes for more GB/s.
    rows = report["scaling"]["rows"]
    assert [r["gbps"] for r in rows] == [1.3, 10.7, 14.8, 30.0]
    nodes = [r["nodes"] for r in rows]
    assert nodes == sorted(nodes) and nodes[0] >= 1

    # Files were really written and stored; only drops of the failed steps are problems.
    assert report["summary"]["files"] >= 1
    assert set(report["summary"]["problems"]) <= {"dropped_trains", "dropped_parts"}

    # The people's part: markdown (also printed) and three PNG plots.
    markdown = (out / "report.md").read_text()
    assert markdown == to_markdown(report)
    assert "| **calstream end to end**" in markdown and "### Scaling" in markdown
    assert markdown.strip() in proc.stdout
    for name in ("ramp.png", "latency.png", "stages.png"):
        head = (out / name).read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n", name


def test_scaling_follows_the_several_nodes_arithmetic() -> None:
    """The README's example (*Several nodes*): compression ~0.45 GB/s of raw input per core,
    a writer at ~1.9 GB/s of raw input, 32-core nodes with 2 processes of 14 workers: writing
    bounds it, 16 processes and 8 nodes for 30 GB/s."""
    from calstream.benchmark.report import scaling

    report = {
        "stages": {"correct x1": {"gbps": 4.5}, "compress x1": {"gbps": 0.45},
                   "write": {"gbps": 1.9}, "receive + decode": {"gbps": 2.3}},
        "sustained": {"cpu_s_per_gb": 2.5}, "latency": {"cpu_s_per_gb": 3.0},
    }
    sc = scaling(report, cores_per_node=32, processes_per_node=2,
                 targets=[("JUNGFRAU-4M", 1.3), ("peak", 30.0)])
    assert sc["workers_per_process"] == 14
    assert sc["per_core_gbps"] == pytest.approx(1 / (1 / 4.5 + 1 / 0.45))
    assert sc["per_process_limit"] == "writer" and sc["per_node_gbps"] == pytest.approx(3.8)
    small, peak = sc["rows"]
    assert (peak["processes"], peak["nodes"]) == (16, 8)
    assert peak["worker_cores"] == pytest.approx(30 * (1 / 4.5 + 1 / 0.45), abs=0.05)
    assert peak["nodes_measured_cpu"] == 3  # 30 GB/s x 2.5 core-s/GB on 32-core nodes
    assert (small["processes"], small["nodes"]) == (1, 1)
