"""End-to-end runtime measurements: sustained rate per worker count, memory per overflow policy.

Not a pytest benchmark: each case runs a real `calstream simulate` sender process (PUSH, as fast
as it can) into a Pipeline in this process, spool and destination on tmpfs so that the VM's slow
first-touch disk writes do not hide the pipeline's own rate::

    .venv/bin/python bench/runtime_bench.py rate --workers 1 2
    .venv/bin/python bench/runtime_bench.py memory --policy block drop-oldest drop-newest

``memory`` runs each policy in a fresh process and reports the peak RSS (``ru_maxrss``) with an
input faster than the pipeline (one worker).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(root: Path, *, workers: int, policy: str, trains: int, cells: int) -> dict:
    import psutil

    from calstream.config import load_config
    from calstream.pipeline import Pipeline

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    port = _free_port()
    constants = root / "constants.h5"
    subprocess.run([str(BIN / "calstream"), "constants", "synth", "--cells", str(cells),
                    "-o", str(constants)], check=True, capture_output=True)
    config = load_config(None, [
        f"source.endpoint=\"tcp://127.0.0.1:{port}\"", "simulate.enabled=false",
        f"calibration.constants=\"{constants}\"", f"calibration.cells={cells}",
        f"output.spool=\"{root / 'spool'}\"", f"output.destination=\"file://{root / 'data'}\"",
        f"pipeline.workers={workers}", f"pipeline.overflow=\"{policy}\"",
        "source.idle_timeout=3.0", "metrics.status=\"off\"",
    ])
    pipeline = Pipeline(config)
    sender = subprocess.Popen(
        [str(BIN / "calstream"), "--log-level", "warning", "simulate",
         "--endpoint", f"tcp://127.0.0.1:{port}", "--cells", str(cells), "--rate", "0",
         "--trains", str(trains), "--constants", str(constants)],
        stdout=subprocess.PIPE, text=True,
    )
    rss_before = psutil.Process().memory_info().rss
    t0 = time.monotonic()
    summary = pipeline.run()
    wall = time.monotonic() - t0
    sender.wait(timeout=60)
    busy = wall - 3.0  # the idle timeout that ended the run
    shutil.rmtree(root, ignore_errors=True)
    return {
        "workers": workers, "policy": policy, "cells": cells, "trains_sent": trains,
        "trains_written": summary.trains, "problems": summary.problems,
        "gbps_raw": round(summary.bytes_in / busy / 1e9, 3),
        "trains_per_s": round(summary.trains / busy, 1),
        "ms_per_train": {k: round(v / max(summary.trains, 1) * 1e3, 1)
                         for k, v in summary.stage_seconds.items()},
        "rss_before_mb": round(rss_before / 2**20),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "sender": sender.stdout.read().strip() if sender.stdout else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["rate", "memory", "case"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--policy", nargs="+", default=["block", "drop-oldest", "drop-newest"])
    parser.add_argument("--trains", type=int, default=200)
    parser.add_argument("--cells", type=int, default=16)
    parser.add_argument("--root", default="/dev/shm/calstream-bench")
    args = parser.parse_args()
    if args.what == "case":
        print(json.dumps(run_case(Path(args.root), workers=args.workers[0],
                                  policy=args.policy[0], trains=args.trains, cells=args.cells)))
        return
    cases = ([(w, "block") for w in args.workers] if args.what == "rate"
             else [(1, p) for p in args.policy])
    for workers, policy in cases:  # a fresh process each: ru_maxrss is per process
        out = subprocess.run(
            [sys.executable, __file__, "case", "--workers", str(workers), "--policy", policy,
             "--trains", str(args.trains), "--cells", str(args.cells), "--root", args.root],
            capture_output=True, text=True, check=True,
        )
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
