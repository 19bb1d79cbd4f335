"""The `calstream` command as a user runs it: simulate, constants synth, check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from calstream.ingest import Receiver

CALSTREAM = str(Path(sys.executable).parent / "calstream")


def test_simulate_streams_trains_a_receiver_decodes(port):
    proc = subprocess.Popen(
        [
            CALSTREAM, "--log-level", "warning", "simulate",
            "--endpoint", f"tcp://127.0.0.1:{port}", "--pattern", "push",
            "--modules", "1-2", "--cells", "1", "--gain-mode", "array",
            "--trains", "3", "--rate", "0", "--first-train-id", "500",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    received = []
    with Receiver(f"tcp://127.0.0.1:{port}", "pull") as receiver:
        for _ in range(3):
            message = receiver.receive(timeout=30)
            if message is None:
                proc.kill()
                pytest.fail(f"no train from calstream simulate: {proc.communicate()}")
            received.append(message)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "sent 3 trains" in out
    tids = [next(iter(meta.values()))["timestamp.tid"] for _, meta in received]
    assert tids == [500, 501, 502]
    data, _ = received[0]
    assert sorted(data) == [
        "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput", "SPB_IRDA_JF4M/DET/JNGFR02:daqOutput"
    ]
    module = data["SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"]
    assert module["data.adc"].shape == (1, 512, 1024)
    assert module["data.gain"].dtype == "uint8"


def test_constants_synth_writes_the_facility_layout(tmp_path):
    out = tmp_path / "jf.h5"
    proc = subprocess.run(
        [CALSTREAM, "constants", "synth", "--detector", "jungfrau", "--cells", "1", "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out) as f:
        for name in ("Offset10Hz", "RelativeGain10Hz", "BadPixelsDark10Hz"):
            assert f[f"{name}/data"].shape == (1024, 512, 1, 3)  # fast_scan, slow_scan, cell, gain


def test_check_prints_the_resolved_config(tmp_path):
    proc = subprocess.run(
        [CALSTREAM, "check", "--set", "output.run=42"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "run = 42" in proc.stdout and "[calibration]" in proc.stdout


def test_check_names_a_missing_constants_file(tmp_path):
    """With synthesize_missing = false, `check` must fail where `run` would: file, key, reason."""
    config = tmp_path / "real.toml"
    config.write_text(
        '[calibration]\nconstants = "cal/jf{module:02d}.h5"\nsynthesize_missing = false\n'
    )
    for command in ("check", "run"):
        proc = subprocess.run(
            [CALSTREAM, command, str(config)], capture_output=True, text=True, timeout=60,
            cwd=tmp_path,
        )
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln]
        assert len(lines) == 1, (command, proc.stderr)
        assert str(config) in lines[0] and "calibration.constants" in lines[0], lines[0]
        assert "cal/jf01.h5" in lines[0] and "not found" in lines[0], lines[0]


def test_output_into_a_closed_pipe_is_no_traceback():
    """`calstream check | head -1` is common; a closed pipe must not print a traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before calstream writes: like head after 1 line
    try:
        proc = subprocess.run(
            [CALSTREAM, "check"], stdout=write_end, stderr=subprocess.PIPE, text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode != 0  # the output did not arrive; say so by the exit code


def test_simulator_port_in_use_is_one_line_naming_the_key(tmp_path):
    """The demo run twice (or beside `calstream simulate`): say which key to change."""
    import zmq

    from tests.conftest import free_port

    port = free_port()
    holder = zmq.Context.instance().socket(zmq.PUSH)
    holder.bind(f"tcp://127.0.0.1:{port}")
    try:
        proc = subprocess.run(
            [CALSTREAM, "run", "--max-trains", "1", "--set", "calibration.cells=1",
             "--set", f"source.endpoint=tcp://127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )
    finally:
        holder.close(linger=0)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1, proc.stderr
    assert "source.endpoint" in lines[0] and "Address already in use" in lines[0], lines[0]


def test_destination_that_cannot_be_created_names_file_and_key(tmp_path):
    (tmp_path / "blocker").write_text("a file where the destination's parent should be")
    config = tmp_path / "dest.toml"
    config.write_text(f'[output]\ndestination = "file://{tmp_path}/blocker/data"\n')
    proc = subprocess.run(
        [CALSTREAM, "run", str(config), "--max-trains", "1", "--set", "calibration.cells=1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(lines) == 1, proc.stderr
    assert f"{config}: output.destination: " in lines[0], lines[0]
    assert "blocker/data" in lines[0], lines[0]


@pytest.mark.parametrize("url", ["/data/proc", "ftp://host/data"])
def test_check_refuses_a_destination_run_would_refuse(tmp_path, url):
    proc = subprocess.run(
        [CALSTREAM, "check", "--set", f"output.destination={url}"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.count("\n") == 1 and "output.destination" in proc.stderr, proc.stderr
