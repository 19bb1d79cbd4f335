"""The whole pipeline into a WebDAV door (wsgidav), spool limits, rollover, retention, kill -9."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the filters for h5py)
import httpx
import numpy as np
import pytest

from calstream.events import Outbox
from calstream.pipeline import Pipeline

from .test_pipeline import BIN, stored_files, validate
from .webdav_fixtures import TOKEN, WebdavServer

NAMES = ["CORR-R0001-JNGFR01-S00000.h5", "CORR-R0001-JNGFR01-S00001.h5"]


def dav_config(make_config, constants, server: WebdavServer, token_file: Path, **overrides):
    return make_config(
        constants,
        simulate__enabled=True,
        simulate__trains=3,
        output__trains_per_file=2,
        output__destination=server.url,
        output__token_file=str(token_file),
        output__store_timeout=2.0,
        output__store_deadline=1.5,
        **overrides,
    )


def download(server: WebdavServer, names: list[str], into: Path) -> None:
    """GET each file back from the door, as a consumer would."""
    into.mkdir(parents=True, exist_ok=True)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client() as client:
        for name in names:
            response = client.get(f"{server.url}/r0001/{name}", headers=headers)
            assert response.status_code == 200
            (into / name).write_bytes(response.content)


def test_pipeline_to_webdav_door(make_config, constants_1cell, webdav, token_file, tmp_path,
                                 caplog):
    caplog.set_level(logging.INFO)
    config = dav_config(make_config, constants_1cell, webdav, token_file, output__uploads=2)
    summary = Pipeline(config).run()
    assert summary.trains == 3 and summary.files == 2 and summary.unstored_files == 0
    assert sorted(webdav.files()) == [f"r0001/{n}" for n in NAMES]
    download(webdav, NAMES, tmp_path / "downloaded" / "r0001")
    validate(tmp_path / "downloaded" / "r0001")
    with Outbox(tmp_path / "spool" / "outbox.sqlite3") as outbox:
        events = [e.record() for e in outbox.entries()]
    assert sorted(e["calstream"]["destination"] for e in events) == sorted(
        f"{webdav.url}/r0001/{n}" for n in NAMES
    )
    assert {e["billingPath"] for e in events} == {f"/pnfs/r0001/{n}" for n in NAMES}
    assert not list((tmp_path / "spool" / "complete").iterdir())
    assert TOKEN not in caplog.text


def test_door_down_keeps_files_then_next_start_stores_once(
    make_config, constants_1cell, webdav_down, token_file, tmp_path, caplog
):
    caplog.set_level(logging.WARNING)
    config = dav_config(make_config, constants_1cell, webdav_down, token_file)
    summary = Pipeline(config).run()
    assert summary.files == 0 and summary.unstored_files == 2 and summary.events == 0
    complete = tmp_path / "spool" / "complete"
    assert sorted(p.name for p in complete.iterdir()) == NAMES
    assert any("gave up uploading" in r.getMessage() and "kept in the spool" in r.getMessage()
               for r in caplog.records)
    with Outbox(tmp_path / "spool" / "outbox.sqlite3") as outbox:
        assert outbox.entries() == []  # nothing announced that is not stored

    webdav_down.start()
    webdav_down.faults.fail("PUT", 503)  # one more hiccup on the way
    summary = Pipeline(config).run(max_trains=0)
    assert summary.files == 2 and summary.events == 2
    assert sorted(webdav_down.files()) == [f"r0001/{n}" for n in NAMES]
    assert not list(complete.iterdir())
    summary = Pipeline(config).run(max_trains=0)
    assert summary.files == 0 and summary.events == 0


def test_corrupting_door_never_gets_a_file_reported_stored(
    make_config, constants_1cell, webdav, token_file, tmp_path
):
    webdav.faults.wrong_digest = 1000
    config = dav_config(make_config, constants_1cell, webdav, token_file)
    summary = Pipeline(config).run()
    assert summary.files == 0 and summary.unstored_files == 2
    assert webdav.files() == {}
    assert len(list((tmp_path / "spool" / "complete").iterdir())) == 2


def test_rollover_by_bytes_and_codecs_per_dataset(make_config, constants_1cell, tmp_path):
    config = make_config(
        constants_1cell,
        simulate__enabled=True,
        simulate__trains=5,
        output__trains_per_file=50,
        output__bytes_per_file=1,  # every train fills a file
        output__compression__adc="zstd:3",
        output__compression__gain="lz4",
        output__compression__mask="blosc:zstd:7",
        output__bitround=10,
    )
    summary = Pipeline(config).run()
    assert summary.files == 5
    files = stored_files(tmp_path / "data")
    assert [p.name[-9:-3] for p in files] == [f"S{i:05d}" for i in range(5)]
    validate(tmp_path / "data" / "r0001")
    with h5py.File(files[0]) as f:
        data = f["INSTRUMENT/SPB_IRDA_JF4M/CORR/JNGFR01:output/data"]
        filters = {k: list(data[k].id.get_create_plist().get_filter(0)[:3]) for k in data
                   if k in ("adc", "gain", "mask")}
        assert filters["adc"][0] == 32015 and list(filters["adc"][2]) == [3]
        assert filters["gain"][0] == 32004 and filters["mask"][0] == 32001
        adc = data["adc"][:]
        assert np.all(adc.view(np.uint32) & ((1 << 13) - 1) == 0)  # 10 mantissa bits kept
    with Outbox(tmp_path / "spool" / "outbox.sqlite3") as outbox:
        record = outbox.entries()[0].record()["calstream"]
    assert record["compression"] == {"adc": "zstd:3", "gain": "lz4", "mask": "blosc:zstd:7"}
    assert record["constants"]["bitround"] == 10  # the loss is on record


def test_retention_keep(make_config, constants_1cell, tmp_path):
    config = make_config(constants_1cell, simulate__enabled=True, simulate__trains=3,
                         output__trains_per_file=2, output__retention="keep")
    assert Pipeline(config).run().files == 2
    kept = sorted((tmp_path / "spool" / "kept").iterdir())
    assert [p.name for p in kept] == NAMES
    for p in kept:
        assert p.read_bytes() == (tmp_path / "data" / "r0001" / p.name).read_bytes()


def test_spool_full_stop_policy(make_config, constants_1cell, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    blocker = tmp_path / "data" / "r0001"
    blocker.parent.mkdir()
    blocker.write_text("not a directory")  # the destination refuses everything
    config = make_config(constants_1cell, simulate__enabled=True, simulate__trains=500,
                         simulate__rate=20.0, output__trains_per_file=1,
                         output__spool_limit=1, output__overflow="stop")
    summary = Pipeline(config).run()
    assert summary.trains < 50
    assert summary.problems.get("spool_full_stop") == 1
    assert any("is full" in r.getMessage() and "overflow = stop" in r.getMessage()
               for r in caplog.records)


def test_spool_full_blocks_until_stopped(make_config, constants_1cell, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    blocker = tmp_path / "data" / "r0001"
    blocker.parent.mkdir()
    blocker.write_text("not a directory")
    config = make_config(constants_1cell, simulate__enabled=True, simulate__trains=500,
                         simulate__rate=50.0, output__trains_per_file=1,
                         output__spool_limit=1, output__overflow="block")
    pipeline = Pipeline(config)
    timer = __import__("threading").Timer(3.0, pipeline.stop)
    timer.start()
    summary = pipeline.run()
    timer.join()
    # blocked after the first file: only the trains already queued got written
    assert summary.trains < 20
    assert any("input blocked" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "webdav"])
def test_kill_9_mid_run_then_restart_stores_each_file_once(
    tmp_path, constants_1cell, webdav, token_file, kind
):
    from .conftest import free_port

    args = [
        str(BIN / "calstream"), "run",
        "--set", f"calibration.constants={constants_1cell}",
        "--set", "calibration.cells=1",
        "--set", "simulate.trains=100000", "--set", "simulate.rate=40",
        "--set", "output.trains_per_file=3",
        "--set", f"source.endpoint=tcp://127.0.0.1:{free_port()}",
    ]
    if kind == "webdav":
        args += ["--set", f"output.destination={webdav.url}",
                 "--set", f"output.token_file={token_file}"]
        data = webdav.root / "r0001"
    else:
        data = tmp_path / "data" / "r0001"
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(data.glob("*.h5"))) < 2:
        time.sleep(0.1)
    time.sleep(0.15)  # somewhere in the middle of writing the next file
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    spool = tmp_path / "spool"
    waiting = sorted(p.name for p in (spool / "complete").iterdir())
    before = {p.name: p.read_bytes() for p in data.glob("*.h5")}  # visible: complete files only
    for name in before:
        with h5py.File(data / name) as f:
            assert len(f["INDEX/trainId"]) == 3, name

    # restart without new data: complete files are stored, unfinished ones moved aside
    done = subprocess.run([*args, "--max-trains", "0"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    after = {p.name: p.read_bytes() for p in data.glob("*.h5")}
    assert set(after) == set(before) | set(waiting)
    assert all(after[name] == content for name, content in before.items())
    assert not list((spool / "complete").iterdir()) and not list((spool / "building").iterdir())
    with Outbox(spool / "outbox.sqlite3") as outbox:
        paths = [e.record()["billingPath"] for e in outbox.entries()]
    assert len(paths) == len(set(paths)) == len(after)  # each file announced exactly once
    assert {Path(p).name for p in paths} == set(after)
    validate(data)
