"""Files the destination refused are tried again in the same run (output.retry_unstored)."""

from __future__ import annotations

import logging

from calstream.pipeline import Pipeline
from calstream.store.retry import RetryQueue

from .test_pipeline import validate
from .webdav_fixtures import WebdavServer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_retry_queue_backoff_recovery_and_final():
    clock = Clock()
    q: RetryQueue[str] = RetryQueue(10.0, clock=clock)
    q.failed("a", "A", 1)
    clock.now += 1
    q.failed("b", "B", 2)
    assert len(q) == 2 and q.take_due() is None and q.take_final() is None
    clock.now += 9.5  # a's back-off has passed, b's not
    assert q.take_due() == ("A", 1) and q.take_due() is None
    q.failed("a", "A", 2)
    clock.now += 0.1
    q.stored()  # the destination took a file: both are due at once, and get a final try
    assert sorted([q.take_due(), q.take_due()]) == [("A", 2), ("B", 2)]
    q.failed("c", "C", 1)
    assert q.take_final() is None  # failed after the last success: left for the next start
    clock.now += 1
    q.stored()
    assert q.take_final() == ("C", 1) and q.drain() == []
    q.failed("d", "D", 3)
    assert q.drain() == [("D", 3)] and len(q) == 0
    q.failed("e", "E", 1, transient=False)  # refused outright: waits for its interval
    clock.now += 1
    q.stored()
    assert q.take_due() is None
    clock.now += 10
    assert q.take_due() == ("E", 1)


def test_door_down_at_start_then_up_mid_run_stores_everything(
    make_config, constants_1cell, webdav_down: WebdavServer, token_file, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    config = make_config(
        constants_1cell, simulate__enabled=True, simulate__trains=8, simulate__rate=4.0,
        output__trains_per_file=1, output__destination=webdav_down.url,
        output__token_file=str(token_file), output__store_timeout=0.5,
        output__store_deadline=0.3, output__retry_unstored=0.3,
    )
    timer = webdav_down.start_after(1.0)
    pipeline = Pipeline(config)
    try:
        summary = pipeline.run()
    finally:
        timer.cancel()
    assert summary.trains == 8
    assert summary.files == 8 and summary.unstored_files == 0 and summary.events == 8
    assert not list((tmp_path / "spool" / "complete").iterdir())
    names = sorted(k for k in webdav_down.files())
    assert names == [f"r0001/CORR-R0001-JNGFR01-S{i:05d}.h5" for i in range(8)]
    messages = [r.getMessage() for r in caplog.records]
    assert any("trying again in" in m and "output.retry_unstored" in m for m in messages)
    assert any("stored at attempt" in m for m in messages)
    counters = pipeline.stats.snapshot()
    assert counters["store_failures"] >= 1 and counters["store_retries"] >= 1
    assert counters["store_retries"] <= counters["store_failures"]
    into = tmp_path / "check" / "r0001"
    into.mkdir(parents=True)
    for name in names:
        (into / name.split("/")[1]).write_bytes(webdav_down.files()[name])
    validate(into)


def test_retry_off_keeps_the_old_behaviour(make_config, constants_1cell, tmp_path):
    blocker = tmp_path / "data" / "r0001"
    blocker.parent.mkdir()
    blocker.write_text("not a directory")
    config = make_config(constants_1cell, simulate__enabled=True, simulate__trains=2,
                         output__trains_per_file=1, output__retry_unstored=0.0)
    summary = Pipeline(config).run()
    assert summary.files == 0 and summary.unstored_files == 2
    assert summary.problems["files_unstored"] == 2
