"""End-to-end runtime measurements: sustained rate per worker count, memory per overflow policy.

Not a pytest benchmark, and not ``calstream bench`` (which ramps rates to find the highest one
kept up with, with drop-newest): each case here sends as fast as the sender process can into
a Pipeline with the given overflow policy, using the same harness (:mod:`calstream.benchmark`:
the sender in its own process, spool and destination on tmpfs so that the VM's slow
first-touch disk writes do not hide the pipeline's own rate)::

    .venv/bin/python bench/runtime_bench.py rate --workers 1 2
    .venv/bin/python bench/runtime_bench.py memory --policy block drop-oldest drop-newest

``rate`` uses ``block`` (the sender is held back by ZeroMQ, nothing is dropped); ``memory``
runs each policy in a fresh process and reports the peak RSS (``ru_maxrss``) with an input
faster than the pipeline (one worker).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_case(root: Path, *, workers: int, policy: str, trains: int, cells: int) -> dict:
    import psutil

    from calstream.benchmark import EndToEnd, SenderProcess, bench_config

    for sub in ("spool", "data"):
        shutil.rmtree(root / sub, ignore_errors=True)
    config, template = bench_config(
        None, [f"pipeline.workers={workers}", f"calibration.cells={cells}"], root,
        overflow=policy,
    )
    modules = tuple(config.source.modules)
    with SenderProcess(config.source.endpoint, modules=modules, cells=cells,
                       constants=template, detector_id=config.source.detector_id) as sender:
        e2e = EndToEnd(config, sender, 512 * 1024 * 2 * cells * len(modules),
                       destination_dir=root / "data")
        try:
            e2e.start()
            rss_before = psutil.Process().memory_info().rss
            t0 = time.monotonic()
            sent = e2e.send(0, trains)  # as fast as it can
            e2e.drain(120.0)
            busy = time.monotonic() - t0
        finally:
            summary = e2e.stop()
    written = summary.trains - 3  # the warm-up trains
    return {
        "workers": workers, "policy": policy, "cells": cells, "trains_sent": sent.trains,
        "trains_written": written, "problems": summary.problems,
        "gbps_raw": round(e2e.train_bytes * written / busy / 1e9, 3),
        "trains_per_s": round(written / busy, 1),
        "ms_per_train": {k: round(v / max(summary.trains, 1) * 1e3, 1)
                         for k, v in summary.stage_seconds.items()},
        "rss_before_mb": round(rss_before / 2**20),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "sender": f"sent {sent.trains} trains at {sent.achieved_hz:.1f}/s",
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
