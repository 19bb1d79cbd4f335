"""The bench's sender: a separate process that streams pre-generated trains on command.

Started by :class:`SenderProcess` (:func:`main` in a child Python); it generates the
simulated trains once (:class:`~calstream.ingest.JungfrauSimulation`, around the pipeline's own
constants), binds a PUSH socket, prints ``ready`` and then runs one step per line on stdin
(``RATE TRAINS``: send TRAINS trains paced at RATE trains/s with
:func:`~calstream.ingest.run_sender`), answering each with one JSON line: what was sent, when
(``time.monotonic()``, the same clock in both processes on Linux) and how fast. Train ids keep
increasing across steps. A separate process, so that generating and sending cost the pipeline
nothing but the ZeroMQ receive it would pay on a real node.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calstream.errors import CalstreamError

__all__ = ["SenderProcess", "StepResult"]


@dataclass(frozen=True)
class StepResult:
    """One step as the sender saw it."""

    rate_hz: float
    trains: int
    start: float  # time.monotonic() when the step began
    seconds: float
    bytes: int

    @property
    def achieved_hz(self) -> float:
        return self.trains / self.seconds if self.seconds > 0 else 0.0


class SenderProcess:
    """Start the sender process and drive it step by step.

    Parameters
    ----------
    endpoint
        ``tcp://127.0.0.1:PORT`` the sender binds (the pipeline connects a PULL socket).
    modules, cells
        What to simulate (one source per module, one endpoint).
    constants
        Constants file template with ``{module}``: the trains are simulated around its offsets
        and gains, like real dark noise around the real pedestal.
    first_train_id
        Train id of the first train.
    """

    def __init__(self, endpoint: str, *, modules: tuple[int, ...], cells: int,
                 constants: str, detector_id: str, first_train_id: int = 10000,
                 timeout: float = 300.0) -> None:
        self.endpoint = endpoint
        self._children_cpu = _children_cpu()
        self._proc = subprocess.Popen(
            # Not "-m": the package imports this module, which runpy would then run a second time.
            [sys.executable, "-c", "from calstream.benchmark.sender import main; main()",
             "--endpoint", endpoint,
             "--modules", ",".join(map(str, modules)), "--cells", str(cells),
             "--constants", constants, "--detector-id", detector_id,
             "--first-train-id", str(first_train_id)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        try:
            line = self._readline(timeout)
        except CalstreamError:
            self.close()
            raise
        if line.strip() != "ready":
            self.close()
            raise CalstreamError(f"the bench sender did not start: {line!r}", source=endpoint)

    def _readline(self, timeout: float) -> str:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait(timeout)
            raise CalstreamError(f"the bench sender exited with code {code} (its error is above)",
                                 source=self.endpoint)
        return line

    def step(self, rate_hz: float, trains: int) -> StepResult:
        """Send ``trains`` trains at ``rate_hz`` and wait until they are sent."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{rate_hz} {trains}\n")
        self._proc.stdin.flush()
        return StepResult(**json.loads(self._readline(300.0)))

    def close(self) -> float:
        """Stop the sender; returns the CPU seconds it used (user + system)."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        return _children_cpu() - self._children_cpu

    def __enter__(self) -> SenderProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    """The sender process's command line (run by :class:`SenderProcess`)."""
    parser = argparse.ArgumentParser(prog="python -m calstream.benchmark.sender")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--modules", required=True)
    parser.add_argument("--cells", type=int, required=True)
    parser.add_argument("--constants", required=True)
    parser.add_argument("--detector-id", required=True)
    parser.add_argument("--first-train-id", type=int, default=10000)
    args = parser.parse_args()

    from calstream.calibrate import load_jungfrau_constants
    from calstream.ingest import JungfrauSimulation, Sender, run_sender

    modules = tuple(int(m) for m in args.modules.split(","))
    consts = {m: load_jungfrau_constants(Path(args.constants.format(module=m)),
                                         cells=args.cells) for m in modules}
    simulation = JungfrauSimulation(
        modules=modules, cells=args.cells, detector_id=args.detector_id,
        offsets={m: c.offset for m, c in consts.items()},
        gains={m: c.rel_gain for m, c in consts.items()},
    )
    del consts
    next_id = args.first_train_id
    with Sender(args.endpoint, "push", bind=True) as sender:
        print("ready", flush=True)
        for line in sys.stdin:
            rate, trains = line.split()
            start = time.monotonic()
            stats = run_sender(sender, simulation, n_trains=int(trains),
                               rate_hz=float(rate) or None, first_train_id=next_id)
            next_id += stats.trains
            result: dict[str, Any] = {"rate_hz": float(rate), "trains": stats.trains,
                                      "start": start, "seconds": stats.seconds,
                                      "bytes": stats.bytes}
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
