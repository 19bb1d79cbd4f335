"""The multi-worker runtime end to end: several endpoints, overflow, metrics, live preview."""

from __future__ import annotations

import logging
import re
import threading
import time
import urllib.request

import numpy as np
import pytest

from calstream.ingest import JungfrauSimulation, Sender
from calstream.pipeline import Pipeline
from tests.conftest import free_port
from tests.test_pipeline import validate


def _send(sender: Sender, messages) -> None:
    for data, meta in messages:
        assert sender.send(data, meta, timeout=60)


def test_modules_from_two_endpoints_are_assembled_and_a_lost_part_is_a_gap(
    make_config, constants_1cell, tmp_path
):
    from extra_data import RunDirectory

    sim = JungfrauSimulation(modules=(1, 2), cells=1, seed=7)
    train_ids = list(range(100, 105))
    split = {
        src: [({src: d[src]}, {src: m[src]}) for d, m in map(sim.train, train_ids)]
        for src in sim.sources
    }
    del split[sim.sources[1]][2]  # the second endpoint loses train 102
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    with Sender(endpoints[0], "push") as s1, Sender(endpoints[1], "push") as s2:
        threads = [
            threading.Thread(target=_send, args=(s, split[src]), daemon=True)
            for s, src in zip((s1, s2), sim.sources, strict=True)
        ]
        for t in threads:
            t.start()
        config = make_config(
            constants_1cell, source__endpoints=endpoints, source__modules=[1, 2],
            pipeline__assembly_timeout=5.0,
        )
        summary = Pipeline(config).run(max_trains=len(train_ids))
        for t in threads:
            t.join(timeout=30)
    assert summary.trains == 5
    assert summary.problems == {"module_missing": 1}
    run_dir = tmp_path / "data" / "r0001"
    validate(run_dir)
    run = RunDirectory(run_dir)
    assert list(run.train_ids) == train_ids
    counts = {
        m: list(run[f"SPB_IRDA_JF4M/CORR/JNGFR{m:02d}:output", "data.adc"].data_counts(
            labelled=False))
        for m in (1, 2)
    }
    assert counts == {1: [1, 1, 1, 1, 1], 2: [1, 1, 0, 1, 1]}


def test_a_silent_endpoint_costs_latency_not_trains(make_config, constants_1cell, tmp_path):
    from extra_data import RunDirectory

    sim = JungfrauSimulation(modules=(1,), cells=1, seed=6)
    train_ids = [300, 301, 302]
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]  # nobody on the second
    with Sender(endpoints[0], "push") as sender:
        thread = threading.Thread(target=_send, args=(sender, map(sim.train, train_ids)),
                                  daemon=True)
        thread.start()
        config = make_config(
            constants_1cell, source__endpoints=endpoints, source__modules=[1, 2],
            pipeline__assembly_timeout=0.3,
        )
        summary = Pipeline(config).run(max_trains=len(train_ids))
        thread.join(timeout=30)
    assert summary.trains == 3 and summary.problems == {"module_missing": 3}
    validate(tmp_path / "data" / "r0001")
    run = RunDirectory(tmp_path / "data" / "r0001")
    assert list(run.train_ids) == train_ids
    assert list(run["SPB_IRDA_JF4M/CORR/JNGFR01:output", "data.adc"].data_counts(
        labelled=False)) == [1, 1, 1]


@pytest.mark.parametrize("policy", ["drop-newest", "drop-oldest"])
def test_input_faster_than_the_pipeline_drops_are_counted_with_train_ids(
    make_config, constants_1cell, port, tmp_path, caplog, policy
):
    from extra_data import RunDirectory

    sim = JungfrauSimulation(modules=(1,), cells=1, seed=8)
    sent = list(range(5000, 5040))
    with Sender(f"tcp://127.0.0.1:{port}", "push") as sender:
        thread = threading.Thread(target=_send, args=(sender, map(sim.train, sent)),
                                  daemon=True)
        thread.start()
        config = make_config(
            constants_1cell, pipeline__overflow=policy, pipeline__workers=1,
            pipeline__queue_size=1, source__idle_timeout=2.0,
        )
        with caplog.at_level(logging.WARNING, logger="calstream.pipeline"):
            summary = Pipeline(config).run()
        thread.join(timeout=30)
    dropped = summary.problems.get("dropped_trains", 0) + summary.problems.get(
        "dropped_parts", 0)
    assert dropped > 0
    assert summary.trains + dropped == len(sent)  # every train written or counted as dropped
    logged = {int(m) for r in caplog.records
              for m in re.findall(r"train (\d+) dropped", r.getMessage())}
    assert len(logged) == dropped and logged <= set(sent)
    run_dir = tmp_path / "data" / "r0001"
    validate(run_dir)
    written = list(RunDirectory(run_dir).train_ids)
    assert written == sorted(set(sent) - logged)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def _value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_prometheus_endpoint_during_a_run(make_config, constants_1cell):
    mport = free_port()
    config = make_config(
        constants_1cell, simulate__enabled=True, simulate__trains=8, simulate__rate=4.0,
        metrics__port=mport, output__trains_per_file=3,
    )
    pipeline = Pipeline(config)
    result: list = []
    thread = threading.Thread(target=lambda: result.append(pipeline.run()), daemon=True)
    thread.start()
    text = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            text = _scrape(mport)
        except OSError:
            text = ""
        if _value(text, "calstream_files_stored_total") >= 1:
            break
        time.sleep(0.2)
    thread.join(timeout=120)
    assert result and result[0].trains == 8
    source = "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"
    assert _value(text, "calstream_trains_written_total") >= 3
    assert _value(text, f'calstream_source_trains_in_total{{source="{source}"}}') >= 3
    assert _value(text, 'calstream_source_bytes_out_total'
                        '{source="SPB_IRDA_JF4M/CORR/JNGFR01:output"}') > 0
    assert _value(text, 'calstream_stage_seconds_count{stage="write"}') >= 3
    assert _value(text, "calstream_latency_seconds_count") >= 3
    assert 'calstream_queue_depth{queue="work"}' in text
    assert _value(text, "calstream_compression_ratio") > 1
    assert _value(text, "calstream_train_ids_skipped_total") == 0
    assert "calstream_events_pending" in text


@pytest.mark.parametrize("pattern", ["rep", "pub"])
def test_live_preview_for_karabo_bridge_client(make_config, constants_1cell, tmp_path, pattern):
    """karabo_bridge.Client watches the corrected stream; it matches what went into the file."""
    from extra_data import RunDirectory
    from karabo_bridge import Client

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = make_config(
        constants_1cell, simulate__enabled=True, simulate__trains=40, simulate__rate=10.0,
        preview__endpoint=endpoint, preview__pattern=pattern, preview__every=2,
        preview__max_rate=0.0,
    )
    pipeline = Pipeline(config)
    thread = threading.Thread(target=pipeline.run, daemon=True)
    thread.start()
    seen = []
    client = Client(endpoint, sock="REQ" if pattern == "rep" else "SUB", timeout=30)
    try:
        for _ in range(3):
            data, meta = client.next()
            seen.append((data, meta))
    finally:
        client._socket.close(linger=0)
        thread.join(timeout=120)
    source = "SPB_IRDA_JF4M/CORR/JNGFR01:output"
    run = RunDirectory(tmp_path / "data" / "r0001")
    for data, meta in seen:
        tid = meta[source]["timestamp.tid"]
        assert tid % 2 == 0  # 1 in 2: trains 10000, 10002, ...
        adc = data[source]["data.adc"]
        assert adc.dtype == np.float32 and adc.shape == (1, 512, 1024)
        _, stored = run.train_from_id(tid)
        np.testing.assert_array_equal(stored[source]["data.adc"].reshape(adc.shape), adc)
        mask = data[source]["data.mask"]
        np.testing.assert_array_equal(stored[source]["data.mask"].reshape(mask.shape), mask)
    assert pipeline.stats.get("preview_sent") >= 3
