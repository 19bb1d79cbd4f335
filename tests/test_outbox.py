"""The durable event outbox: ordering, idempotence, concurrency, crash safety."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from calstream.errors import ConfigError, EventError
from calstream.events import (
    OUTBOX_FILENAME,
    EventSettings,
    Outbox,
    OutboxEntry,
    StorageEvent,
    build_storage_event,
    format_entries,
)
from calstream.store.records import FileInfo, StoredFile

SETTINGS = EventSettings(cell_domain="testhost", host="testhost", ce_source="calstream://test")


def make_event(n: int, *, run: int = 7) -> StorageEvent:
    name = f"CORR-R{run:04d}-JNGFR01-S{n:05d}.h5"
    info = FileInfo(
        path=Path("/spool/complete") / name,
        relpath=f"r{run:04d}/{name}",
        size=1000 + n,
        run=run,
        proposal=900001,
        sequence=n,
        detector="jungfrau",
        module=1,
        sources=("SPB_IRDA_JF4M/CORR/JNGFR01:output",),
        first_train=10000 + 10 * n,
        last_train=10009 + 10 * n,
        trains=10,
        frames=160,
        compression={"adc": "bitshuffle-lz4"},
    )
    stored = StoredFile(
        url=f"file:///data/r{run:04d}/{name}",
        path=f"/data/r{run:04d}/{name}",
        size=1000 + n,
        adler32=f"{n:08x}",
        transfer_time_s=0.5,
        protocol="file",
    )
    return build_storage_event(stored, info, SETTINGS)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "spool" / OUTBOX_FILENAME


@pytest.fixture
def outbox(db: Path):
    with Outbox(db) as box:
        yield box


def run_python(code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_add_is_idempotent_and_durable_format(outbox, db):
    event = make_event(0)
    assert outbox.add(event) is True
    assert outbox.add(event) is False
    assert outbox.counts() == {"pending": 1, "sent": 0}
    assert db.is_file()
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_entry_round_trip(outbox):
    event = make_event(3)
    outbox.add(event)
    (entry,) = outbox.entries()
    assert isinstance(entry, OutboxEntry)
    assert entry.seq == 1
    assert entry.event_id == event.id
    assert entry.key == event.key
    assert entry.key_bytes() == event.key.encode()
    assert entry.value == event.value_bytes()
    assert entry.headers == event.headers
    assert entry.state == "pending"
    assert entry.attempts == 0
    assert entry.sent_at is None and entry.last_error is None
    assert entry.record() == event.value
    assert entry.event() == event
    assert outbox.get(event.id) == entry
    assert outbox.get("no-such-id") is None


def test_same_id_for_another_file_is_an_error(outbox):
    event = make_event(0)
    outbox.add(event)
    clash = StorageEvent(id=event.id, key="/elsewhere.h5", value={}, headers=())
    with pytest.raises(EventError, match="another file"):
        outbox.add(clash)


def test_pending_order_limit_and_mark_sent(outbox):
    events = [make_event(n) for n in range(10)]
    for event in events:
        outbox.add(event)
    assert [e.event_id for e in outbox.pending()] == [e.id for e in events]
    first = outbox.pending(limit=3)
    assert [e.event_id for e in first] == [e.id for e in events[:3]]
    assert [e.seq for e in first] == [1, 2, 3]

    assert outbox.mark_sent(e.event_id for e in first) == 3
    assert outbox.mark_sent([first[0].event_id, "unknown"]) == 0  # acked twice: ignored
    assert [e.event_id for e in outbox.pending(limit=3)] == [e.id for e in events[3:6]]
    assert outbox.counts() == {"pending": 7, "sent": 3}
    sent = outbox.entries("sent")
    assert [e.event_id for e in sent] == [e.id for e in events[:3]]
    assert all(e.sent_at and e.attempts == 1 for e in sent)
    assert [e.seq for e in outbox.entries()] == list(range(1, 11))
    with pytest.raises(ConfigError, match="pending, sent"):
        outbox.entries("lost")
    with pytest.raises(ConfigError):
        outbox.pending(limit=0)


def test_mark_failed_keeps_event_first_in_line(outbox):
    a, b = make_event(0), make_event(1)
    outbox.add(a)
    outbox.add(b)
    assert outbox.mark_failed(a.id, "KafkaTimeoutError: broker down") is True
    assert outbox.mark_failed(a.id, "again") is True
    assert outbox.mark_failed("unknown", "x") is False
    head = outbox.pending(limit=1)[0]
    assert head.event_id == a.id
    assert head.attempts == 2
    assert head.last_error == "again"
    assert head.state == "pending"
    outbox.mark_sent([a.id])
    assert outbox.mark_failed(a.id, "late") is False  # sent events stay sent
    entry = outbox.get(a.id)
    assert entry.state == "sent" and entry.attempts == 3


def test_has_file(outbox):
    event = make_event(5)
    assert not outbox.has_file(event.key)
    outbox.add(event)
    assert outbox.has_file(event.key)
    outbox.mark_sent([event.id])
    assert outbox.has_file(event.key)
    assert not outbox.has_file(make_event(6).key)


def test_survives_reopen(db):
    events = [make_event(n) for n in range(5)]
    with Outbox(db) as box:
        for event in events:
            box.add(event)
        box.mark_sent([events[0].id])
        box.mark_failed(events[1].id, "boom")
    with Outbox.in_spool(db.parent) as box:
        assert box.path == db
        assert box.counts() == {"pending": 4, "sent": 1}
        assert [e.event_id for e in box.pending()] == [e.id for e in events[1:]]
        assert box.get(events[1].id).last_error == "boom"
        assert box.add(events[2]) is False
        new = make_event(9)
        assert box.add(new) is True
        assert box.entries()[-1].seq == 6
    with Outbox(db, readonly=True) as reader:  # no writer open: WAL files were cleaned up
        assert [e.seq for e in reader.entries()] == [1, 2, 3, 4, 5, 6]
        assert reader.pending(limit=1)[0].event_id == events[1].id


def test_threads_add_and_read_concurrently(outbox):
    per_thread, n_threads = 25, 4
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(t: int) -> None:
        try:
            for n in range(per_thread):
                assert outbox.add(make_event(n, run=t + 1))
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            while not done.is_set():
                seqs = [e.seq for e in outbox.pending(limit=1000)]
                assert seqs == sorted(seqs)
                outbox.counts()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert errors == []
    entries = outbox.entries()
    assert len(entries) == per_thread * n_threads
    assert [e.seq for e in entries] == list(range(1, per_thread * n_threads + 1))
    assert len({e.key for e in entries}) == per_thread * n_threads


READER = """
import json, sys
from calstream.events import Outbox
with Outbox(sys.argv[1], readonly=True, timeout=2) as box:
    print(json.dumps({"ids": [e.event_id for e in box.entries()], "counts": box.counts(),
                      "has": box.has_file(sys.argv[2])}))
    try:
        box.mark_sent([e.event_id for e in box.entries()])
    except Exception as exc:
        print(type(exc).__name__)
"""


def test_reader_in_another_process_sees_committed_rows(outbox, db):
    events = [make_event(n) for n in range(3)]
    for event in events:
        outbox.add(event)
    outbox.mark_sent([events[0].id])

    # another writer holds the write lock with an uncommitted row: the reader neither
    # blocks nor sees it (WAL)
    with sqlite3.connect(db, isolation_level=None) as raw:
        raw.execute("BEGIN IMMEDIATE")
        raw.execute(
            "INSERT INTO events (event_id, key, value, headers, created)"
            " VALUES ('uncommitted', '/x.h5', x'7b7d', '[]', '2026-01-01T00:00:00+00:00')"
        )
        started = time.monotonic()
        proc = run_python(READER, str(db), events[2].key)
        assert time.monotonic() - started < 10
        raw.execute("ROLLBACK")
    assert proc.returncode == 0, proc.stderr
    out, error = proc.stdout.splitlines()
    seen = json.loads(out)
    assert seen["ids"] == [e.id for e in events]
    assert seen["counts"] == {"pending": 2, "sent": 1}
    assert seen["has"] is True
    assert error == "EventError"  # read-only: cannot mark anything

    later = make_event(3)
    outbox.add(later)  # writer still open: the row is only in the WAL
    seen = json.loads(run_python(READER, str(db), later.key).stdout.splitlines()[0])
    assert seen["ids"][-1] == later.id
    assert seen["has"] is True
    assert outbox.counts() == {"pending": 3, "sent": 1}  # the reader changed nothing


WRITER = """
import sys, uuid
from calstream.events import Outbox, StorageEvent
box = Outbox(sys.argv[1])
payload = {"msgType": "transfer", "pad": "x" * 4000}
n = 0
while True:
    n += 1
    event_id = str(uuid.uuid4())
    event = StorageEvent(id=event_id, key=f"/data/{sys.argv[2]}/{n}.h5",
                         value={**payload, "n": n},
                         headers=(("ce_id", event_id.encode()),))
    box.add(event)
    sys.stdout.write(event_id + "\\n")
    sys.stdout.flush()
"""


@pytest.mark.timeout(60)
def test_kill_9_keeps_every_acknowledged_event(db):
    acknowledged: list[str] = []
    for round_, kill_after in enumerate((1, 10, 100)):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(round_)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            seen = 0
            while seen < kill_after:
                line = proc.stdout.readline()
                assert line, f"writer died: {proc.stderr.read().decode()}"
                acknowledged.append(line.decode().strip())
                seen += 1
            os.kill(proc.pid, signal.SIGKILL)
            rest, _ = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        # every id printed before the kill was acknowledged; a cut-off last line was not
        acknowledged.extend(x.decode() for x in rest.split(b"\n")[:-1])

    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Outbox(db) as box:
        ids = [e.event_id for e in box.entries()]
        assert set(acknowledged) <= set(ids)
        assert len(ids) == len(set(ids))
        assert box.add(make_event(0)) is True  # still writable after the crashes
        assert box.counts()["pending"] == len(ids) + 1


def test_readonly_errors(tmp_path):
    with pytest.raises(EventError, match="no event outbox"):
        Outbox(tmp_path / "missing.sqlite3", readonly=True)
    empty = tmp_path / "empty.sqlite3"
    sqlite3.connect(empty).close()
    empty.write_bytes(b"")
    with pytest.raises(EventError, match="not a calstream event outbox"):
        Outbox(empty, readonly=True)


def test_not_a_database(tmp_path):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(EventError) as info:
        Outbox(junk)
    assert str(junk) in str(info.value)


def test_newer_format_is_refused(db):
    Outbox(db).close()
    with sqlite3.connect(db) as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(EventError, match="newer"):
        Outbox(db)


def test_closed_outbox(db):
    box = Outbox(db)
    box.close()
    box.close()
    with pytest.raises(EventError, match="closed"):
        box.add(make_event(0))
    assert "closed" in repr(box)


def test_format_entries(outbox):
    assert format_entries([]) == "no events"
    a, b = make_event(1), make_event(2)
    outbox.add(a)
    outbox.add(b)
    outbox.mark_sent([a.id])
    outbox.mark_failed(b.id, "broker unreachable")
    lines = format_entries(outbox.entries()).splitlines()
    assert lines[0].split() == ["SEQ", "STATE", "CREATED", "SIZE", "ADLER32", "PATH"]
    assert len(lines) == 3
    assert lines[1].split()[0:2] == ["1", "sent"]
    assert lines[1].endswith(a.key)
    assert "1001" in lines[1] and "00000001" in lines[1]
    assert lines[2].split()[1] == "pending"
    verbose = format_entries(outbox.entries(), verbose=True)
    assert '"msgType": "transfer"' in verbose
    assert "broker unreachable" in verbose
    assert f"header ce_id: {b.id}" in verbose
