"""The runtime's parts on their own: stage queues, train assembly, metrics, status line."""

from __future__ import annotations

import io
import logging
import threading
import time
import urllib.request

import pytest

from calstream.ingest.assembler import TrainAssembler
from calstream.metrics import MetricsServer, Stats, StatusLine
from calstream.queues import CLOSED, StageQueue

# -- stage queues -----------------------------------------------------------------------------


def test_block_policy_waits_and_numbers_items_contiguously():
    q: StageQueue[str] = StageQueue(2)
    assert q.put("a") and q.put("b")
    assert q.put("c", timeout=0.05) is False  # full: not dropped, the caller still has it
    assert q.dropped == 0
    done = threading.Event()

    def producer() -> None:
        q.put("c")
        done.set()

    threading.Thread(target=producer, daemon=True).start()
    assert not done.wait(0.1)
    assert q.get() == (0, "a")
    assert done.wait(2)
    assert q.get() == (1, "b") and q.get() == (2, "c")
    assert q.get(timeout=0.01) is None
    q.close()
    assert q.get() is CLOSED
    with pytest.raises(RuntimeError):
        q.put("d")


@pytest.mark.parametrize(
    ("policy", "kept", "dropped"),
    [("drop-newest", ["t1", "t2"], ["t3", "t4"]), ("drop-oldest", ["t3", "t4"], ["t1", "t2"])],
)
def test_drop_policies_report_every_drop(policy, kept, dropped):
    seen: list[tuple[str, str]] = []
    q: StageQueue[str] = StageQueue(2, policy, on_drop=lambda item, why: seen.append((item, why)))
    results = [q.put(t) for t in ("t1", "t2", "t3", "t4")]
    assert results == ([True, True, False, False] if policy == "drop-newest" else [True] * 4)
    assert seen == [(t, "queue-full") for t in dropped]
    assert q.dropped == 2 and q.high_water == 2
    # Numbers stay contiguous whatever was dropped: the writer's reordering relies on it.
    assert [q.get(), q.get()] == [(0, kept[0]), (1, kept[1])]


def test_close_lets_consumers_drain_first():
    q: StageQueue[int] = StageQueue(3)
    q.put(1)
    q.close()
    assert q.get() == (0, 1)
    assert q.get() is CLOSED and q.get(timeout=0) is CLOSED


def test_bad_queue_parameters():
    with pytest.raises(ValueError, match="maxsize"):
        StageQueue(0)
    with pytest.raises(ValueError, match="drop-oldest"):
        StageQueue(1, "drop-random")  # type: ignore[arg-type]


# -- train assembly ---------------------------------------------------------------------------

A, B = "DET/JNGFR01:daqOutput", "DET/JNGFR02:daqOutput"


def part(*sources: str) -> tuple[dict, dict]:
    return {s: {"x": s} for s in sources}, {s: {"timestamp.tid": 0} for s in sources}


def test_one_endpoint_hands_trains_on_at_once_even_when_incomplete():
    asm = TrainAssembler({A, B}, n_endpoints=1, timeout=10)
    ready, rejected = asm.add(0, 5, *part(A), now=0.0)
    assert rejected == []
    assert [(t.train_id, t.missing) for t in ready] == [(5, (B,))]  # nothing more can come


def test_two_endpoints_merge_by_train_id():
    asm = TrainAssembler({A, B}, n_endpoints=2, timeout=10)
    assert asm.add(0, 5, *part(A), now=0.0) == ([], [])
    ready, _ = asm.add(1, 5, *part(B), now=0.1)
    assert len(ready) == 1 and set(ready[0].data) == {A, B} and ready[0].missing == ()
    assert ready[0].first_seen == 0.0


def test_a_lost_part_is_a_gap_once_every_endpoint_has_moved_on():
    asm = TrainAssembler({A, B}, n_endpoints=2, timeout=10)
    asm.add(0, 5, *part(A), now=0.0)
    asm.add(0, 6, *part(A), now=0.1)          # endpoint 1 never sends train 5
    ready, _ = asm.add(1, 6, *part(B), now=0.2)
    assert [(t.train_id, t.missing) for t in ready] == [(5, (B,)), (6, ())]


def test_a_silent_endpoint_costs_latency_not_throughput():
    asm = TrainAssembler({A, B}, n_endpoints=2, timeout=1.0)
    for i, tid in enumerate(range(10, 14)):
        assert asm.add(0, tid, *part(A), now=i * 0.1)[0] == []
    assert asm.expire(0.99) == []
    assert [t.train_id for t in asm.expire(1.05)] == [10]
    assert [t.train_id for t in asm.expire(1.35)] == [11, 12, 13]
    assert all(t.missing == (B,) for t in asm.flush()) and len(asm) == 0


def test_pending_trains_are_bounded():
    asm = TrainAssembler({A, B}, n_endpoints=2, timeout=100, max_pending=3)
    out = []
    for tid in range(1, 11):
        out += asm.add(0, tid, *part(A), now=0.0)[0]
    assert len(asm) == 3
    assert [t.train_id for t in out] == list(range(1, 8))


def test_backwards_duplicate_and_unknown_sources_are_rejected():
    asm = TrainAssembler({A, B}, n_endpoints=2, timeout=10, floor=100)
    _, rejected = asm.add(0, 100, *part(A), now=0)
    assert [(r.reason, r.train_id) for r in rejected] == [("backwards", 100)]
    asm.add(0, 101, *part(A), now=0)
    _, rejected = asm.add(0, 101, *part(A, "../../etc/passwd"), now=0)
    assert sorted((r.reason, r.sources) for r in rejected) == [
        ("duplicate", (A,)), ("unknown-source", ("../../etc/passwd",)),
    ]
    ready = asm.flush()
    assert [t.train_id for t in ready] == [101]
    assert set(ready[0].data) == {A}  # the unknown source is never passed on


def test_a_wild_jump_is_rejected_until_the_next_train_confirms_it():
    asm = TrainAssembler({A}, n_endpoints=1, max_jump=1000)
    assert [t.train_id for t in asm.add(0, 10, *part(A), now=0)[0]] == [10]
    ready, rejected = asm.add(0, 2**62, *part(A), now=0)     # a corrupt train id
    assert ready == [] and [r.reason for r in rejected] == ["jump"]
    assert [t.train_id for t in asm.add(0, 11, *part(A), now=0)[0]] == [11]
    # A real jump (e.g. the detector restarted much later) is confirmed by the next train.
    assert [r.reason for r in asm.add(0, 500_000, *part(A), now=0)[1]] == ["jump"]
    assert [t.train_id for t in asm.add(0, 500_001, *part(A), now=0)[0]] == [500_001]


# -- metrics ----------------------------------------------------------------------------------


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        return reply.read().decode()


def test_prometheus_endpoint_serves_counters_labels_histograms_and_gauges(port):
    stats = Stats()
    stats.add("trains_in", 3)
    stats.add("source_bytes_in", 100, source=A)
    stats.add("dropped", queue="work", reason="drop-oldest")
    stats.add("rejected", reason="malformed")
    stats.observe("stage_seconds", 0.003, stage="correct")
    stats.observe("stage_seconds", 0.2, stage="correct")
    gauges = {"queue_depth": {"work": 2}, "files_pending": 1, "compression_ratio": 2.5}
    server = MetricsServer(stats, lambda: gauges, port=port)
    try:
        text = _get(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.close()
    assert "calstream_trains_in_total 3.0" in text
    assert f'calstream_source_bytes_in_total{{source="{A}"}} 100.0' in text
    assert 'calstream_dropped_total{queue="work",reason="drop-oldest"} 1.0' in text
    assert 'calstream_rejected_total{reason="malformed"} 1.0' in text
    assert 'calstream_stage_seconds_bucket{le="0.005",stage="correct"} 1.0' in text
    assert 'calstream_stage_seconds_bucket{le="+Inf",stage="correct"} 2.0' in text
    assert 'calstream_stage_seconds_count{stage="correct"} 2.0' in text
    assert 'calstream_queue_depth{queue="work"} 2.0' in text
    assert "calstream_compression_ratio 2.5" in text
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{port}/metrics")  # closed


def test_metrics_port_in_use_is_a_clear_error(port):
    server = MetricsServer(Stats(), dict, port=port)
    try:
        with pytest.raises(ValueError, match=r"metrics\.port"):
            MetricsServer(Stats(), dict, port=port)
    finally:
        server.close()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_on_a_terminal_and_log_lines_otherwise(caplog):
    stats = Stats()
    tty = _Tty()
    line = StatusLine("demo", stats, lambda: (3, 8), stream=tty)
    assert line.mode == "line"
    stats.add("trains_in", 20)
    stats.add("trains_written", 10)
    stats.add("bytes_in", 2e9)
    stats.observe("latency_seconds", 0.25)
    line.tick(now=time.monotonic() + 2)
    line.close()
    out = tty.getvalue()
    assert out.startswith("\r") and out.endswith("\n")
    assert "20 in, 10 written" in out and "latency 250 ms" in out and "backlog 3/8" in out

    plain = io.StringIO()
    logged = StatusLine("demo", stats, lambda: (0, 8), stream=plain, log_every=5)
    assert logged.mode == "log"
    with caplog.at_level(logging.INFO, logger="calstream.metrics"):
        logged.tick(now=time.monotonic() + 1)   # not due yet
        logged.tick(now=time.monotonic() + 6)
    assert plain.getvalue() == ""
    assert [r.getMessage() for r in caplog.records if "backlog 0/8" in r.getMessage()]


def test_preview_thinning_one_in_n_and_at_most_k_hz():
    from calstream.preview import PreviewPublisher

    every = PreviewPublisher("tcp://127.0.0.1:*", every=3, max_rate=0)
    limited = PreviewPublisher("tcp://127.0.0.1:*", "rep", every=1, max_rate=1.0)
    try:
        assert [every.wants(t) for t in range(7)] == [True, False, False, True, False, False,
                                                     True]
        assert [limited.wants(t) for t in range(3)] == [True, False, False]  # within 1 s
        assert every.endpoint.startswith("tcp://127.0.0.1:")
    finally:
        every.close()
        limited.close()
        limited.close()  # safe twice
