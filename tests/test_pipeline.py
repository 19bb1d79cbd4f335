"""The whole pipeline against the facility's own peers: karabo-bridge servers in, EXtra-data out."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from calstream.calibrate import JungfrauCorrector, load_jungfrau_constants
from calstream.events import Outbox
from calstream.ingest import JungfrauSimulation
from calstream.pipeline import Pipeline

BIN = Path(sys.executable).parent


def validate(path: Path) -> None:
    """EXtra-data's own validator must accept what we wrote."""
    exe = shutil.which("extra-data-validate", path=str(BIN)) or "extra-data-validate"
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.h5"))


def test_karabo_bridge_server_to_extra_data(make_config, constants_1cell, port, tmp_path):
    """REQ against karabo_bridge.ServerInThread; the run reads back bit for bit."""
    from extra_data import RunDirectory
    from extra_data.components import JUNGFRAU
    from karabo_bridge import ServerInThread

    simulation = JungfrauSimulation(modules=(1,), cells=1, gain_mode="bits", seed=3)
    train_ids = [20000, 20001, 20002, 20005, 20006]  # a jump is fine, only backwards is not
    sent = []
    server = ServerInThread(f"tcp://127.0.0.1:{port}", sock="REP", maxlen=len(train_ids))
    server.start()
    try:
        for tid in train_ids:
            data, meta = simulation.train(tid)
            sent.append(data[simulation.sources[0]]["data.adc"].copy())
            server.feed(data, meta)
        config = make_config(
            constants_1cell,
            source__pattern="req",
            output__trains_per_file=2,
            output__run=17,
        )
        summary = Pipeline(config).run(max_trains=len(train_ids))
    finally:
        server.stop()

    assert summary.trains == 5
    assert summary.files == 3 and summary.events == 3
    assert summary.problems == {}
    run_dir = tmp_path / "data" / "r0017"
    files = stored_files(tmp_path / "data")
    assert [f.name for f in files] == [
        f"CORR-R0017-JNGFR01-S{seq:05d}.h5" for seq in range(3)
    ]
    assert all(f.parent == run_dir for f in files)
    validate(run_dir)

    run = RunDirectory(run_dir)
    assert list(run.train_ids) == train_ids
    jf = JUNGFRAU(run)
    adc = jf.get_array("data.adc")
    assert adc.shape == (1, 5, 1, 512, 1024)  # module, train, cell, ss, fs

    # Bit for bit what the kernel gives for the raw data that was served.
    consts = load_jungfrau_constants(constants_1cell, cells=1)
    corrector = JungfrauCorrector(consts, backend="numba")
    for i, raw in enumerate(sent):
        out = np.empty((1, 512, 1024), np.float32)
        gain = np.empty(out.shape, np.uint8)
        mask = np.empty(out.shape, np.uint32)
        corrector.correct(raw, None, np.zeros(1, np.uint8), out, gain, mask)
        np.testing.assert_array_equal(adc.values[0, i], out)
        np.testing.assert_array_equal(jf.get_array("data.mask").values[0, i], mask)

    # One event per stored file, with the file's real size and adler32.
    outbox = Outbox(tmp_path / "spool" / "outbox.sqlite3")
    try:
        entries = outbox.entries()
    finally:
        outbox.close()
    assert len(entries) == 3
    for entry, path in zip(entries, files, strict=True):
        value = json.loads(entry.value)
        assert value["msgType"] == "transfer" and value["isWrite"] == "write"
        assert value["fileSize"] == path.stat().st_size
        digest = f"{zlib.adler32(path.read_bytes()) & 0xFFFFFFFF:08x}"
        assert value["calstream"]["checksum"]["adler32"] == digest
    # Nothing is left half-done: no hidden temporaries, no spool files.
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    for area in ("building", "complete", "failed"):
        assert not list((tmp_path / "spool" / area).glob("*.h5")), area


@pytest.fixture(scope="module")
def mock_raw_run(tmp_path_factory):
    """A raw JUNGFRAU run made by EXtra-data's own mock-data writer."""
    from extra_data.tests.make_examples import write_file
    from extra_data.tests.mockdata.jungfrau import JUNGFRAUModule

    run_dir = tmp_path_factory.mktemp("raw") / "r0012"
    run_dir.mkdir()
    write_file(
        str(run_dir / "RAW-R0012-JNGFR01-S00000.h5"),
        [JUNGFRAUModule("SPB_IRDA_JF4M/DET/JNGFR01", raw=True)],
        ntrains=4,
        chunksize=1,
        format_version="1.0",
    )
    return run_dir


@pytest.mark.timeout(120)
def test_serve_files_mock_run(make_config, constants_16cell, mock_raw_run, port, tmp_path):
    """karabo-bridge-serve-files streams an EXtra-data mock run; we write exactly its trains."""
    from extra_data import RunDirectory

    served = list(RunDirectory(mock_raw_run).train_ids)
    exe = shutil.which("karabo-bridge-serve-files", path=str(BIN)) or "karabo-bridge-serve-files"
    proc = subprocess.Popen(
        [exe, str(mock_raw_run), f"tcp://127.0.0.1:{port}", "-z", "REP"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read().decode()  # e.g. a missing dependency
        config = make_config(
            constants_16cell, cells=16, source__pattern="req", output__run=12,
            output__trains_per_file=10, source__idle_timeout=20.0,
        )
        summary = Pipeline(config).run(max_trains=len(served))
    finally:
        proc.kill()
        proc.wait()
    assert summary.trains == len(served)
    assert summary.problems == {}
    out_dir = tmp_path / "data" / "r0012"
    validate(out_dir)
    run = RunDirectory(out_dir)
    assert list(run.train_ids) == served
    assert run.instrument_sources == {"SPB_IRDA_JF4M/CORR/JNGFR01:output"}


def test_demo_command_from_the_readme(tmp_path):
    """`calstream run configs/demo.toml`, shortened, in a fresh directory."""
    repo = Path(__file__).resolve().parents[1]
    config = repo / "configs" / "demo.toml"
    from tests.conftest import free_port

    cmd = [
        str(BIN / "calstream"), "run", str(config),
        "--set", "simulate.trains=6", "--set", "output.trains_per_file=4",
        "--set", "calibration.cells=1",
        "--set", f"source.endpoint=tcp://127.0.0.1:{free_port()}",
    ]
    start = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "trains   6" in out and "files    2 stored" in out and "events   2" in out
    assert (tmp_path / "constants" / "jungfrau-JNGFR01.h5").exists()  # made on first run
    assert len(stored_files(tmp_path / "data")) == 2
    assert time.monotonic() - start < 300

    listing = subprocess.run(
        [str(BIN / "calstream"), "events", "list", "spool"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    assert "CORR-R0001-JNGFR01-S00000.h5" in listing.stdout


def test_cli_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[output]\ntrains_per_file = 0\n")
    proc = subprocess.run(
        [str(BIN / "calstream"), "run", str(bad)], capture_output=True, text=True, timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(bad) in lines[0] and "output.trains_per_file" in lines[0]

    proc = subprocess.run(
        [
            str(BIN / "calstream"), "run",
            "--set", "calibration.synthesize_missing=false",
            "--set", "calibration.constants=missing/jf{module:02d}.h5",
        ],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln]
    assert len(lines) == 1, proc.stderr
    assert "missing/jf01.h5" in lines[0] and "not found" in lines[0]
    assert not (tmp_path / "data").exists()


def test_unreachable_destination_keeps_files_until_next_start(
    make_config, constants_1cell, tmp_path
):
    """Files the destination refuses stay in the spool; the next start stores and announces them."""
    blocker = tmp_path / "data" / "r0001"
    blocker.parent.mkdir()
    blocker.write_text("not a directory")  # the run's folder cannot be created
    config = make_config(
        constants_1cell, simulate__enabled=True, simulate__trains=3, output__trains_per_file=2
    )
    summary = Pipeline(config).run()
    assert summary.trains == 3
    assert summary.files == 0 and summary.unstored_files == 2 and summary.events == 0
    complete = sorted((tmp_path / "spool" / "complete").glob("*.h5"))
    assert [p.name for p in complete] == [
        "CORR-R0001-JNGFR01-S00000.h5", "CORR-R0001-JNGFR01-S00001.h5"
    ]

    blocker.unlink()
    summary = Pipeline(config).run(max_trains=0)
    assert summary.files == 2 and summary.events == 2 and summary.unstored_files == 0
    stored = stored_files(tmp_path / "data")
    assert [p.name for p in stored] == [p.name for p in complete]
    validate(tmp_path / "data" / "r0001")
    assert not list((tmp_path / "spool" / "complete").glob("*.h5"))

    # A third start finds nothing to do and announces nothing twice.
    summary = Pipeline(config).run(max_trains=0)
    assert summary.files == 0 and summary.events == 0
    with Outbox(tmp_path / "spool" / "outbox.sqlite3") as outbox:
        assert len(outbox.entries()) == 2


def test_slow_req_server_loses_no_train(make_config, constants_1cell, port, tmp_path):
    """A REP bridge slower than the receiver's poll interval: every train still arrives."""
    import threading

    from extra_data import RunDirectory
    from karabo_bridge import ServerInThread

    simulation = JungfrauSimulation(modules=(1,), cells=1, seed=4)
    train_ids = [30000, 30001, 30002, 30003]
    server = ServerInThread(f"tcp://127.0.0.1:{port}", sock="REP", maxlen=1)
    server.start()

    def feed() -> None:
        for tid in train_ids:
            time.sleep(0.4)  # 2.5 Hz: slower than the 0.2 s receive poll
            server.feed(*simulation.train(tid))

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        config = make_config(constants_1cell, source__pattern="req")
        summary = Pipeline(config).run(max_trains=len(train_ids))
    finally:
        feeder.join(timeout=10)
        server.stop()
    assert summary.trains == len(train_ids) and summary.problems == {}
    assert list(RunDirectory(tmp_path / "data" / "r0001").train_ids) == train_ids


def test_bad_input_is_counted_and_good_data_keeps_flowing(make_config, constants_1cell, port,
                                                          tmp_path, caplog):
    """Malformed trains and modules are rejected with a count; nothing malformed is written."""
    import msgpack
    from extra_data import RunDirectory
    from extra_data.components import JUNGFRAU

    from calstream.ingest import Sender

    simulation = JungfrauSimulation(modules=(1,), cells=1, seed=5)
    source = simulation.sources[0]

    def train(tid: int, **replace: object):
        data, meta = simulation.train(tid)
        data = {source: {**data[source], **replace}}
        return data, meta

    def with_sources(tid: int, *names: str):
        data, meta = train(tid)
        for name in names:  # sources that try to escape a path, or are just odd
            data[name] = {"data.adc": np.zeros((1, 512, 1024), np.uint16)}
            meta[name] = {**meta[source], "source": name}
        return data, meta

    header = msgpack.packb({"source": source, "content": "msgpack",
                            "metadata": {"timestamp.tid": 1006}})
    garbage = [
        [b"\x00garbage", b"\xff"],                                 # not msgpack
        [header, msgpack.packb({}), msgpack.packb(                  # truncated array buffer
            {"source": source, "content": "array", "path": "data.adc", "dtype": "uint16",
             "shape": [1, 512, 1024]}), b"\x00" * 1000],
        [header, msgpack.packb({}), msgpack.packb(                  # absurd size
            {"source": source, "content": "array", "path": "data.adc", "dtype": "uint16",
             "shape": [2**40, 2**20]}), b""],
        [msgpack.packb({"source": source, "content": "pickle"}), b""],  # unknown content
    ]
    messages = [
        train(1001),
        train(0),                                                   # no valid train id
        train(1002, **{"data.memoryCell": np.array([0.5])}),        # float memory cell
        train(1003, **{"data.frameNumber": np.zeros(3, np.uint64)}),  # wrong length
        train(1004, **{"data.adc": np.zeros((1, 512, 1024), np.float32)}),  # wrong dtype
        train(1000),                                                # backwards
        train(1004),                                                # the same train again
        train(1005),
        train(2**62),                                               # a corrupt train id
        with_sources(1006, "../../evil", "/abs/evil", "odd\x00name:out", "SPB/DET/X:y"),
        train(1007, **{"data.adc": np.zeros((2, 512, 1024), np.uint16)}),  # wrong shape
        train(1008, **{"data.gain": np.zeros((1, 512, 1024), np.float32)}),  # wrong gain dtype
        train(1009),
    ]

    def send_all(sender: Sender) -> None:
        for data, meta in messages[:8]:
            assert sender.send(data, meta, timeout=60)
        for frames in garbage:
            sender._socket.send_multipart(frames)
        for data, meta in messages[8:]:
            assert sender.send(data, meta, timeout=60)

    # PUSH blocks until the pipeline connects, so the messages go out from a thread.
    with Sender(f"tcp://127.0.0.1:{port}", "push") as sender:
        thread = threading.Thread(target=send_all, args=(sender,), daemon=True)
        thread.start()
        config = make_config(constants_1cell)
        pipeline = Pipeline(config)
        summary = pipeline.run(max_trains=9)
        thread.join(timeout=30)

    assert summary.trains == 9
    assert summary.problems == {
        "rejected_messages": 1 + len(garbage), "rejected_trains_backwards": 2,
        "rejected_train_id_jump": 1, "module_rejected": 5, "ignored_sources": 4,
    }
    # Every rejection names the source and the train where the message had one.
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("train 1002" in e and source in e and "data.memoryCell" in e for e in errors)
    assert any("train 1007" in e and "data.adc" in e for e in errors)
    assert any("train 1006" in e and "data.adc" in e and "exceeds" in e for e in errors)
    assert any("train 1004 rejected" in e for e in errors)
    assert any(str(2**62) in e and "ahead" in e for e in errors)
    assert any("pickle" in e for e in errors)
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "'../../evil'" in warnings and "'/abs/evil'" in warnings
    assert pipeline.stats.labelled()["rejected", (("reason", "unknown-source"),)] == 4
    run_dir = tmp_path / "data" / "r0001"
    validate(run_dir)
    run = RunDirectory(run_dir)
    assert list(run.train_ids) == [1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009]
    # Only the good trains carry data; the others are recorded as gaps (count 0).
    counts = run["SPB_IRDA_JF4M/CORR/JNGFR01:output", "data.adc"].data_counts(labelled=False)
    assert list(counts) == [1, 0, 0, 0, 1, 1, 0, 0, 1]
    adc = JUNGFRAU(run).get_array("data.adc")
    assert adc.shape[1:] == (4, 1, 512, 1024)  # EXtra-data leaves out trains without data
    assert list(adc.coords["train"].values) == [1001, 1005, 1006, 1009]
    assert run.all_sources == {"SPB_IRDA_JF4M/CORR/JNGFR01:output"}
    # Nothing escaped: every file under tmp_path is where it belongs.
    names = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert not any("evil" in n or "odd" in n for n in names)


def test_restarted_run_continues_after_its_trains(make_config, constants_1cell, tmp_path):
    """Running the same run twice (e.g. the demo) keeps the run readable by EXtra-data."""
    from extra_data import RunDirectory

    config = make_config(
        constants_1cell, simulate__enabled=True, simulate__trains=3, output__trains_per_file=2
    )
    first = Pipeline(config).run()
    second = Pipeline(config).run()
    assert first.trains == second.trains == 3
    run = RunDirectory(tmp_path / "data" / "r0001")
    assert list(run.train_ids) == list(range(10000, 10006))
    names = sorted(p.name for p in (tmp_path / "data" / "r0001").glob("*.h5"))
    assert names == [f"CORR-R0001-JNGFR01-S{seq:05d}.h5" for seq in range(4)]


def test_simulation_shorter_than_max_trains_ends(make_config, constants_1cell):
    config = make_config(constants_1cell, simulate__enabled=True, simulate__trains=3)
    summary = Pipeline(config).run(max_trains=50)
    assert summary.trains == 3


def test_files_read_back_with_only_h5py_and_hdf5plugin(make_config, constants_1cell, tmp_path):
    """A reader with h5py + hdf5plugin and no calstream gets the values calstream wrote."""
    config = make_config(constants_1cell, simulate__enabled=True, simulate__trains=2)
    Pipeline(config).run()
    (path,) = stored_files(tmp_path / "data")
    group = "INSTRUMENT/SPB_IRDA_JF4M/CORR/JNGFR01:output/data"
    script = (
        "import sys, hashlib, h5py, hdf5plugin\n"
        "with h5py.File(sys.argv[1], 'r') as f:\n"
        "    for key in ('adc', 'gain', 'mask'):\n"
        "        print(key, hashlib.sha1(f[sys.argv[2] + '/' + key][()].tobytes()).hexdigest())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HDF5_PLUGIN_PATH"}
    proc = subprocess.run([sys.executable, "-c", script, str(path), group],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(path, "r") as f:
        expected = {key: hashlib.sha1(f[f"{group}/{key}"][()].tobytes()).hexdigest()
                    for key in ("adc", "gain", "mask")}
    assert dict(line.split() for line in proc.stdout.splitlines()) == expected


def test_sigterm_drains_stores_and_exits_zero(tmp_path, constants_1cell):
    from tests.conftest import free_port

    proc = subprocess.Popen(
        [
            str(BIN / "calstream"), "run",
            "--set", f"calibration.constants={constants_1cell}",
            "--set", "calibration.cells=1",
            "--set", "simulate.trains=100000", "--set", "simulate.rate=20",
            "--set", "output.trains_per_file=1000",
            "--set", f"source.endpoint=tcp://127.0.0.1:{free_port()}",
        ],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    building = tmp_path / "spool" / "building"
    while time.monotonic() < deadline and not list(building.glob("*.h5")):
        time.sleep(0.2)  # wait until a file is open
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM" in err
    stored = stored_files(tmp_path / "data")
    assert len(stored) == 1  # the open file was closed and stored
    assert not list(building.glob("*.h5"))
    assert "files    1 stored" in out
