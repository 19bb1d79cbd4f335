"""Two calstream processes behind one PUSH sender share the trains and write each once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import hdf5plugin  # noqa: F401  (EXtra-data reads the compressed chunks)
import pytest

from calstream.ingest import JungfrauSimulation, Sender
from tests.conftest import free_port
from tests.test_pipeline import validate

CALSTREAM = str(Path(sys.executable).parent / "calstream")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_processes_write_every_train_exactly_once(tmp_path, constants_1cell):
    from extra_data import RunDirectory
    from extra_data.components import JUNGFRAU

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    logs: dict[str, list[str]] = {"A": [], "B": []}
    procs = {}
    for name in logs:
        procs[name] = subprocess.Popen(
            [CALSTREAM, "run",
             "--set", f"calibration.constants={constants_1cell}",
             "--set", "calibration.cells=1", "--set", "calibration.synthesize_missing=false",
             "--set", "simulate.enabled=false", "--set", f"source.endpoint={endpoint}",
             "--set", "source.idle_timeout=4", "--set", "output.trains_per_file=8",
             "--set", f"output.spool={tmp_path / ('spool' + name)}",
             "--set", f"output.destination=file://{tmp_path / 'data'}",
             "--set", f"output.aggregator=JNGFR{name}",
             "--set", f"pipeline.name=node{name}"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        threading.Thread(target=lambda p=procs[name], out=logs[name]: out.extend(p.stderr),
                         daemon=True).start()
    sim = JungfrauSimulation(modules=(1,), cells=1, seed=9)
    sent = list(range(7000, 7040))
    with Sender(endpoint, "push") as sender:
        deadline = time.monotonic() + 120
        while not all(any("receiving" in line for line in out) for out in logs.values()):
            assert time.monotonic() < deadline, logs
            assert all(p.poll() is None for p in procs.values()), logs
            time.sleep(0.2)
        time.sleep(1.0)  # both PULL sockets connected: PUSH deals trains round-robin
        for tid in sent:
            assert sender.send(*sim.train(tid), timeout=60)
            time.sleep(0.02)
    for name, proc in procs.items():
        proc.wait(timeout=120)
        assert proc.returncode == 0, "".join(logs[name])[-3000:]

    run_dir = tmp_path / "data" / "r0001"
    by_process = {name: sorted(run_dir.glob(f"CORR-R0001-JNGFR{name}01-S*.h5")) for name in logs}
    assert all(by_process.values()), by_process  # each got a share
    validate(run_dir)
    run = RunDirectory(run_dir)   # refuses a train written twice ("conflicting data")
    assert list(run.train_ids) == sent
    shares = [set(RunDirectory(run_dir, include=f"*JNGFR{name}*").train_ids) for name in logs]
    assert not shares[0] & shares[1] and shares[0] | shares[1] == set(sent)
    adc = JUNGFRAU(run).get_array("data.adc").sortby("train")
    assert list(adc.coords["train"].values) == sent
