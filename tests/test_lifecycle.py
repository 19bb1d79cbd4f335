"""Signals and start-up checks, as a user meets them with the `calstream run` command."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from calstream.errors import ConfigError
from calstream.pipeline import Pipeline
from tests.conftest import free_port
from tests.test_pipeline import stored_files, validate

CALSTREAM = str(Path(sys.executable).parent / "calstream")


def _start(tmp_path: Path, constants: Path, *sets: str) -> subprocess.Popen:
    args = [
        CALSTREAM, "run",
        "--set", f"calibration.constants={constants}", "--set", "calibration.cells=1",
        "--set", "simulate.trains=100000", "--set", "simulate.rate=20",
        "--set", "output.trains_per_file=10",
        "--set", f"source.endpoint=tcp://127.0.0.1:{free_port()}",
    ]
    for item in sets:
        args += ["--set", item]
    return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_open_file(tmp_path: Path, proc: subprocess.Popen, stored: int = 0) -> None:
    deadline = time.monotonic() + 60
    building = tmp_path / "spool" / "building"
    while time.monotonic() < deadline:
        if list(building.glob("*.h5")) and len(stored_files(tmp_path / "data")) >= stored:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    raise AssertionError("no file opened within 60 s")


@pytest.mark.slow
def test_second_signal_exits_at_once_leaving_nothing_half_done(tmp_path, constants_1cell):
    proc = _start(tmp_path, constants_1cell)
    _wait_for_open_file(tmp_path, proc, stored=1)
    # Two different signals: two of the same kind sent at once may merge into one.
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "second SIGTERM: exiting now" in err
    # What a consumer sees at the destination is only ever complete files.
    run_dir = tmp_path / "data" / "r0001"
    for path in stored_files(tmp_path / "data"):
        with h5py.File(path, "r") as f:
            assert f["INDEX/trainId"].shape == (10,)
    validate(run_dir)
    # The next start clears the spool: the unfinished file goes to failed/, never onwards.
    restart = subprocess.run(
        [CALSTREAM, "run", "--max-trains", "0",
         "--set", f"calibration.constants={constants_1cell}", "--set", "calibration.cells=1",
         "--set", "simulate.enabled=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert restart.returncode == 0, restart.stderr[-2000:]
    assert not list((tmp_path / "spool" / "building").glob("*.h5"))
    assert list((tmp_path / "spool" / "failed").glob("*.h5"))
    validate(run_dir)


def test_a_drain_longer_than_drain_timeout_exits(tmp_path, constants_1cell):
    proc = _start(tmp_path, constants_1cell, "pipeline.drain_timeout=0.001")
    _wait_for_open_file(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, err[-2000:]
    assert "draining took longer than 0.001 s (pipeline.drain_timeout)" in err


def test_unwritable_destination_fails_fast(make_config, constants_1cell, tmp_path):
    config = make_config(constants_1cell, output__destination="file:///proc")
    with pytest.raises(ConfigError, match=r"output\.destination.*/proc does not take files"):
        Pipeline(config)
    assert not (tmp_path / "spool").exists() or not list((tmp_path / "spool").rglob("*.h5"))


def test_too_little_spool_space_fails_fast(make_config, constants_1cell):
    config = make_config(constants_1cell, output__trains_per_file=10**7)
    with pytest.raises(ConfigError, match=r"output\.spool.*GB free.*trains_per_file"):
        Pipeline(config)
