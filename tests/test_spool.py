"""The spool: building -> complete -> stored, crash recovery, sequence numbers."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from calstream.errors import ConfigError, StoreError
from calstream.store import ExdfFileWriter, Spool, get_codec, read_file_info
from calstream.store.spool import corr_filename, parse_corr_filename


def test_creates_its_folders(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "a" / "spool")
    for name in ("building", "complete", "failed", "stored"):
        assert (tmp_path / "a" / "spool" / name).is_dir()
    assert spool.building_path("x.h5") == spool.building / "x.h5"


@pytest.mark.parametrize("name", ["", ".", "..", "../x.h5", "a/b.h5", "/etc/passwd", ".hidden"])
def test_building_path_refuses_anything_but_a_file_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(StoreError, match="plain file name"):
        Spool(tmp_path).building_path(name)


def test_file_lifecycle(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.building_path("CORR-R0001-JNGFR01-S00000.h5")
    path.write_bytes(b"data")
    done = spool.mark_complete(path)
    assert done == spool.complete / path.name
    assert done.read_bytes() == b"data"
    assert not path.exists()
    assert spool.recover() == [done]
    spool.remove(done)
    assert not done.exists()
    assert (spool.stored / path.name).exists()
    spool.remove(done)  # again: already gone is fine
    assert spool.recover() == []
    assert (spool.stored / path.name).read_bytes() == b""  # no train id given


def test_remove_keeps_the_last_train_id_in_the_marker(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.complete / "CORR-R0001-JNGFR01-S00000.h5"
    path.write_bytes(b"data")
    spool.remove(path, last_train=1234)
    marker = spool.stored / path.name
    assert json.loads(marker.read_text()) == {"last_train": 1234}
    spool.remove(path)  # again, without the id: the marker keeps it
    assert json.loads(marker.read_text()) == {"last_train": 1234}
    assert sorted(p.name for p in spool.stored.iterdir()) == [path.name]


def write_file(folder: Path, name: str, train_ids: list[int]) -> Path:
    """A small real corrected file (train ids from the name's module get count 0)."""
    codec = get_codec("none")
    run, _, module, seq = parse_corr_filename(name)  # type: ignore[misc]
    w = ExdfFileWriter(
        folder / name, source=f"X_JF4M/CORR/JNGFR{module:02d}:output", cells=1,
        frame_shape=(4, 4), codecs={"adc": codec, "gain": codec, "mask": codec}, run=run,
        proposal=1, sequence=seq, provenance={}, max_trains=10, module=module,
    )  # fmt: skip
    for tid in train_ids:
        w.write_train(tid, 0, None)
    return w.close().path


def test_last_train_ids(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, fsync=False)
    assert spool.last_train_ids(1) == {}
    # module 1: stored S0 (train 100), S1 in complete/ (up to 205), S2 in failed/ (up to 300)
    done = write_file(spool.complete, "CORR-R0001-JNGFR01-S00000.h5", [98, 99, 100])
    spool.remove(done, last_train=100)
    write_file(spool.complete, "CORR-R0001-JNGFR01-S00001.h5", [201, 205])
    failed = write_file(spool.failed, "CORR-R0001-JNGFR01-S00002.h5", [299, 300])
    failed.rename(failed.with_name(failed.name + ".1"))
    assert spool.last_train_ids(1) == {1: 300}
    # module 2: a higher stored marker wins over the files; an old empty marker counts as 0
    write_file(spool.complete, "CORR-R0001-JNGFR02-S00001.h5", [201, 205])
    (spool.stored / "CORR-R0001-JNGFR02-S00000.h5").write_text('{"last_train": 999}\n')
    (spool.stored / "CORR-R0001-JNGFR02-S00002.h5").touch()
    # module 3: only an old marker and an unfinished file (no INDEX) -> unknown
    (spool.stored / "CORR-R0001-JNGFR03-S00000.h5").touch()
    (spool.failed / "CORR-R0001-JNGFR03-S00001.h5").write_bytes(b"not hdf5")
    # module 4: a broken marker is ignored with a warning
    (spool.stored / "CORR-R0001-JNGFR04-S00000.h5").write_text("garbage")
    # other runs, detectors and names are not counted
    write_file(spool.complete, "CORR-R0002-JNGFR01-S00000.h5", [5000])
    (spool.stored / "CORR-R0001-AGIPD01-S00000.h5").write_text('{"last_train": 7777}')
    (spool.stored / ".CORR-R0001-JNGFR01-S00009.h5.tmp").write_text('{"last_train": 8888}')
    (spool.complete / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="calstream.store.spool"):
        assert spool.last_train_ids(1, "JNGFR") == {1: 300, 2: 999, 3: 0, 4: 0}
    assert "JNGFR04" in caplog.text
    assert spool.last_train_ids(1) == {1: 7777, 2: 999, 3: 0, 4: 0}
    assert spool.last_train_ids(2) == {1: 5000}


def test_moves_only_its_own_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    outside = tmp_path / "CORR-R0001-JNGFR01-S00000.h5"
    outside.write_bytes(b"x")
    with pytest.raises(StoreError, match="not in the spool's building/"):
        spool.mark_complete(outside)
    with pytest.raises(StoreError, match="not in the spool's complete/"):
        spool.remove(outside)
    assert outside.exists()
    with pytest.raises(StoreError, match=r"missing\.h5"):
        spool.mark_complete(spool.building / "missing.h5")


def test_recover_moves_unfinished_files_to_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    (spool.building / "CORR-R0001-JNGFR01-S00003.h5").write_bytes(b"partial")
    (spool.failed / "CORR-R0001-JNGFR01-S00003.h5").write_bytes(b"older")
    for seq in (2, 1):
        (spool.complete / f"CORR-R0001-JNGFR01-S{seq:05d}.h5").write_bytes(b"done")
    with caplog.at_level(logging.WARNING, logger="calstream.store.spool"):
        pending = spool.recover()
    assert [p.name for p in pending] == [
        "CORR-R0001-JNGFR01-S00001.h5",
        "CORR-R0001-JNGFR01-S00002.h5",
    ]
    assert list(spool.building.iterdir()) == []
    assert sorted(p.name for p in spool.failed.iterdir()) == [
        "CORR-R0001-JNGFR01-S00003.h5",
        "CORR-R0001-JNGFR01-S00003.h5.1",
    ]
    assert (spool.failed / "CORR-R0001-JNGFR01-S00003.h5.1").read_bytes() == b"partial"
    assert "unfinished spool file" in caplog.text


def test_next_sequence(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.next_sequence(1, "JNGFR", 1) == 0
    (spool.complete / "CORR-R0001-JNGFR01-S00002.h5").touch()
    (spool.failed / "CORR-R0001-JNGFR01-S00004.h5.1").touch()
    (spool.stored / "CORR-R0001-JNGFR01-S00003.h5").touch()
    (spool.building / "CORR-R0001-JNGFR02-S00009.h5").touch()  # another module
    (spool.building / "CORR-R0002-JNGFR01-S00009.h5").touch()  # another run
    (spool.building / "notes.txt").touch()
    assert spool.next_sequence(1, "JNGFR", 1) == 5
    assert spool.next_sequence(1, "JNGFR", 2) == 10
    assert spool.next_sequence(1, "AGIPD", 1) == 0
    spool.remove(spool.complete / "CORR-R0001-JNGFR01-S00002.h5")
    assert spool.next_sequence(1, "JNGFR", 1) == 5


def test_corr_filenames() -> None:
    name = corr_filename(12, "JNGFR", 3, 45)
    assert name == "CORR-R0012-JNGFR03-S00045.h5"
    assert parse_corr_filename(name) == (12, "JNGFR", 3, 45)
    assert parse_corr_filename("CORR-R0012-JF4M03-S00045.h5") == (12, "JF4M", 3, 45)
    assert parse_corr_filename("RAW-R0012-JNGFR03-S00045.h5") is None
    for args in [(10000, "JNGFR", 1, 0), (1, "JNGFR", 100, 0), (1, "JNGFR", 1, -1),
                 (1, "../x", 1, 0), (1, "", 1, 0), (1, "A/B", 1, 0)]:  # fmt: skip
        with pytest.raises(ConfigError):
            corr_filename(*args)


CHILD = """
import sys, numpy as np
from calstream.store import SequenceWriter, Spool, get_codec
codec = get_codec("bitshuffle-lz4")
spool = Spool(sys.argv[1], fsync=False)
sw = SequenceWriter(spool, run=1, proposal=1, detector="jungfrau", module=1, aggregator="JNGFR",
                    source="X_JF4M/CORR/JNGFR01:output", cells=1, frame_shape=(64, 64),
                    codecs={"adc": codec, "gain": codec, "mask": codec}, trains_per_file=3,
                    provenance={})
frame = np.ones((1, 64, 64), np.float32)
chunks = {k: codec.encode_frames(frame.astype(t)) for k, t in (("adc", "f4"), ("gain", "u1"),
                                                                ("mask", "u4"))}
small = {"memoryCell": np.zeros(1), "frameNumber": np.zeros(1)}
tid = 1
while True:
    for info in sw.write_train(tid, 0, chunks, small):
        print(info.path.name, flush=True)
    tid += 1
"""


def test_kill_9_leaves_only_complete_files_in_complete(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(spool_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        for _ in range(2):
            child.stdout.readline()  # two files completed
        deadline = time.monotonic() + 20
        while not any((spool_dir / "building").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    spool = Spool(spool_dir)
    pending = spool.recover()
    assert len(pending) >= 2
    for path in pending:  # every complete file is a whole, readable file
        info = read_file_info(path)
        assert info.trains == 3
    assert list(spool.building.iterdir()) == []
    assert spool.next_sequence(1, "JNGFR", 1) >= len(pending)


def test_retention_keep_and_usage(tmp_path) -> None:
    from calstream.store.spool import SpoolLimit

    spool = Spool(tmp_path / "spool", fsync=False, retention="keep")
    path = spool.building_path("CORR-R0001-JNGFR01-S00000.h5")
    path.write_bytes(b"x" * 1000)
    assert spool.usage() == 1000
    limit = SpoolLimit(spool, 1000, "stop")
    assert limit.full()
    import threading

    assert limit.wait(threading.Event()) is False and limit.stopped
    done = spool.mark_complete(path)
    spool.remove(done, last_train=5)
    assert (spool.kept / path.name).read_bytes() == b"x" * 1000
    assert spool.usage() == 1000  # kept files count
    assert SpoolLimit(spool, None).wait(threading.Event())
    assert SpoolLimit(spool, 2000).wait(threading.Event())
    with pytest.raises(ConfigError, match="retention must be one of delete, keep"):
        Spool(tmp_path / "x", retention="forever")
    with pytest.raises(ConfigError, match="overflow must be one of block, stop"):
        SpoolLimit(spool, 1, "drop")
