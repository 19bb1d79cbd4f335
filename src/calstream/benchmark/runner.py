"""``calstream bench``: one run that measures end to end, each stage alone and the baseline.

Order: constants (synthesised once into ``root/constants`` unless the config names existing
ones), the stages alone and the baseline (nothing else running), then the sender process and
the pipeline: a warm-up, the ramp, and a fixed-rate step at ``latency_fraction`` of the
highest rate kept up with. The result is a plain dict (:mod:`calstream.benchmark.report`
writes it as JSON, markdown and plots).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calstream.benchmark.endtoend import EndToEnd
from calstream.benchmark.sender import SenderProcess
from calstream.benchmark.stages import BenchData, measure_baseline, measure_stages

__all__ = ["BenchOptions", "bench_config", "run_bench"]

log = logging.getLogger(__name__)

# tmpfs: new pages on this VM's disk cost a host first-touch (DESIGN.md §7)
DEFAULT_ROOT = ("/dev/shm/calstream-bench" if os.path.isdir("/dev/shm")
                else os.path.join(tempfile.gettempdir(), "calstream-bench"))


@dataclass(frozen=True)
class BenchOptions:
    """What ``calstream bench`` measures and how long it takes.

    ``quick`` shortens every phase (CI-sized: well under a minute with 1-cell trains).
    """

    config: str | None = None
    overrides: tuple[str, ...] = ()
    root: str = DEFAULT_ROOT
    destination: str = ""  # empty: file://ROOT/data (deleted as files arrive)
    start_hz: float = 2.0
    factor: float = 1.5
    max_hz: float = 500.0
    step_seconds: float = 5.0
    refine: int = 2
    latency_fraction: float = 0.5
    latency_seconds: float = 10.0
    rounds: int = 5
    baseline_trains: int = 3
    write_trains: int = 20
    node_cores: int = 32
    processes_per_node: int = 2
    targets_gbps: tuple[tuple[str, float], ...] = (
        ("JUNGFRAU-4M, 16 cells", 1.3), ("LPD-1M", 10.7), ("AGIPD-1M", 14.8),
        ("facility peak", 30.0),
    )
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick_options(cls, **kwargs: Any) -> BenchOptions:
        base = {"step_seconds": 1.5, "refine": 0, "latency_seconds": 2.0, "rounds": 2,
                "baseline_trains": 1, "write_trains": 4, "start_hz": 4.0, "factor": 2.0}
        base.update(kwargs)
        return cls(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_config(config_file: str | None, overrides: Sequence[str], root: Path,
                 port: int | None = None, *, destination: str = "",
                 overflow: str = "drop-newest") -> tuple[Any, str]:
    """The pipeline config under test, and its constants template.

    ``config_file`` and ``overrides`` as for ``calstream run``; the bench then points the
    source at the sender process on ``port`` (PULL; default: a free one), turns off what is
    not measured (simulation, metrics, preview, Kafka), puts the spool under ``root`` and the
    files into
    ``destination`` (default ``file://ROOT/data``). Constants the config names are used if they
    exist, else synthetic ones are written once into ``root/constants``.
    """
    from calstream.calibrate import synth_jungfrau_constants
    from calstream.config import load_config

    config = load_config(config_file, overrides)
    port = port or _free_port()
    cal = config.calibration
    template = cal.constants
    if config_file is None or not all(cal.constants_path(m).exists()
                                         for m in config.source.modules):
        const_dir = root / "constants"
        const_dir.mkdir(parents=True, exist_ok=True)
        template = str(const_dir / f"jungfrau-{cal.cells}cell-JNGFR{{module:02d}}.h5")
        for module in config.source.modules:
            path = Path(template.format(module=module))
            if not path.exists():  # kept between runs: synthesising 16 cells takes a while
                log.info("writing synthetic constants %s", path)
                synth_jungfrau_constants(path, cells=cal.cells, seed=module)
    spool = root / "spool"
    destination = destination or f"file://{root / 'data'}"
    bench = [
        f'source.endpoint="tcp://127.0.0.1:{port}"', "source.endpoints=[]",
        'source.pattern="pull"', "source.bind=false", "source.idle_timeout=0.0",
        'source.input_source="{detector_id}/DET/JNGFR{module:02d}:daqOutput"',
        'source.gain_mode="bits"', "simulate.enabled=false",
        f'calibration.constants="{template}"', "calibration.synthesize_missing=false",
        f'output.spool="{spool}"', f'output.destination="{destination}"',
        f'pipeline.overflow="{overflow}"', 'metrics.status="off"', "metrics.port=0",
        'preview.endpoint=""', "events.kafka.bootstrap_servers=[]",
    ]
    return load_config(config_file, [*overrides, *bench]), template


def _bench_data(config: Any, template: str) -> BenchData:
    from calstream.calibrate import JungfrauCorrector, load_jungfrau_constants
    from calstream.ingest import JungfrauSimulation
    from calstream.store import parse_codec

    module = config.source.modules[0]
    consts = load_jungfrau_constants(Path(template.format(module=module)),
                                     cells=config.calibration.cells)
    sim = JungfrauSimulation(modules=(module,), cells=config.calibration.cells, n_distinct=1,
                             detector_id=config.source.detector_id,
                             offsets={module: consts.offset}, gains={module: consts.rel_gain})
    data, _ = sim.train(10000)
    values = data[sim.sources[0]]
    corrector = JungfrauCorrector(consts, backend=config.calibration.backend)
    corrector.warmup()
    codecs = {key: parse_codec(config.output.compression.get(key, "bitshuffle-lz4"))
              for key in ("adc", "gain", "mask")}
    return BenchData(np.ascontiguousarray(values["data.adc"]),
                     np.asarray(values["data.memoryCell"]), corrector, codecs, sim.sources[0])


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)} | {
        "max": float(arr.max()), "mean": float(arr.mean()), "n": len(values)}


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Run the whole bench; returns the report as a dict (see :mod:`.report`)."""
    root = Path(options.root)
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("spool", "data", "stage-spool"):
        shutil.rmtree(root / sub, ignore_errors=True)
    started = time.time()
    config, template = bench_config(options.config, options.overrides, root,
                                    destination=options.destination)
    workers = config.pipeline.workers
    modules = tuple(config.source.modules)
    cells = config.calibration.cells

    log.info("stages alone and baseline")
    data = _bench_data(config, template)
    train_bytes = data.nbytes * len(modules)
    stages = measure_stages(data, workers=workers, spool=root / "stage-spool",
                            rounds=options.rounds, write_trains=options.write_trains,
                            trains_per_file=config.output.trains_per_file)
    baseline = measure_baseline(data, trains=options.baseline_trains,
                                path=root / "baseline.h5")
    del data

    log.info("end to end: sender process → pipeline (spool %s)", config.output.spool)
    dest = config.output.destination
    dest_dir = Path(dest.removeprefix("file://")) if dest.startswith("file://") else None
    # Drops in the steps that are not kept up are expected, counted and reported: one
    # warning per dropped train (and an info line per stored file) would bury the report.
    pipeline_log = logging.getLogger("calstream.pipeline")
    level = pipeline_log.level
    if not log.isEnabledFor(logging.DEBUG):
        pipeline_log.setLevel(logging.ERROR)
    with SenderProcess(config.source.endpoint, modules=modules, cells=cells,
                       constants=template, detector_id=config.source.detector_id) as sender:
        e2e = EndToEnd(config, sender, train_bytes, destination_dir=dest_dir)
        try:
            e2e.start()
            t_ramp = time.monotonic()
            ramp = e2e.ramp(start_hz=options.start_hz, factor=options.factor,
                            max_hz=options.max_hz, step_seconds=options.step_seconds,
                            refine=options.refine)
            good = [s for s in ramp if s.kept_up]
            best = max(good, key=lambda s: s.rate_hz) if good else None
            latency_hz = (best.rate_hz if best else options.start_hz) * options.latency_fraction
            fixed = e2e.fixed(round(latency_hz, 2), options.latency_seconds)
            timeline = [
                {"t": s.t - t_ramp, "trains_written": s.trains_written,
                 "trains_in": s.trains_in, "dropped": s.dropped} for s in e2e.timeline
            ]
            offered = [(a - t_ramp, b - t_ramp, r) for a, b, r in e2e.offered]
            ratio, file_per_raw = e2e.corrected_ratio()
        finally:
            summary = e2e.stop()
            pipeline_log.setLevel(level)
        sender_cpu = sender.close()

    sustained = best.gbps if best else 0.0
    bound_stage = min(
        ("receive + decode", f"correct x{workers}", f"compress x{workers}", "write"),
        key=lambda k: stages[k].gbps)
    # The slowest stage bounds a pipeline whose stages each have their own cores; on a small
    # machine they share them, and the sum of their costs per GB bounds it as well.
    cores = len(os.sched_getaffinity(0))
    serial = ("receive + decode", "correct x1", "compress x1", "write")
    core_s_per_gb = sum(1 / stages[k].gbps for k in serial)
    report: dict[str, Any] = {
        "version": 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                    "load_avg": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version()},
        "config": {"file": options.config, "overrides": list(options.overrides),
                   "modules": list(modules), "cells": cells, "workers": workers,
                   "backend": config.calibration.backend,
                   "compression": {k: data_spec for k, data_spec in
                                   config.output.compression.items()},
                   "spool": config.output.spool, "destination": dest,
                   "train_bytes": train_bytes, "trains_per_file": config.output.trains_per_file},
        "options": {k: v for k, v in asdict(options).items() if k not in ("extra",)},
        "sustained": {
            "rate_hz": best.rate_hz if best else 0.0, "gbps": sustained,
            "cpu_s_per_gb": best.cpu_s_per_gb if best else 0.0,
            "stage_seconds_per_train": best.stage_seconds if best else {},
            "max_tried_hz": max(s.rate_hz for s in ramp),
            "capped": bool(best and best.rate_hz == max(s.rate_hz for s in ramp)),
        },
        "ramp": [s.to_dict() for s in ramp],
        "latency": {
            "rate_hz": fixed.rate_hz, "gbps": fixed.gbps, "fraction": options.latency_fraction,
            "kept_up": fixed.kept_up, "dropped": fixed.dropped,
            "seconds": _percentiles(fixed.latencies), "values": fixed.latencies,
            "cpu_s_per_gb": fixed.cpu_s_per_gb,
            "stage_seconds_per_train": fixed.stage_seconds,
        },
        "compression": {"ratio": ratio, "file_bytes_per_raw_byte": file_per_raw},
        "stages": {k: asdict(v) for k, v in stages.items()},
        "baseline": asdict(baseline),
        "bound": {"stage": bound_stage, "gbps": stages[bound_stage].gbps,
                  "cores": cores, "core_s_per_gb": core_s_per_gb,
                  "shared_cores_gbps": cores / core_s_per_gb},
        "ratios": {
            "calstream_per_bound": sustained / stages[bound_stage].gbps,
            "calstream_per_shared_cores_bound": sustained * core_s_per_gb / cores,
            "calstream_per_baseline": sustained / baseline.gbps if baseline.gbps else 0.0,
            "bound_per_memory_copy": stages[bound_stage].gbps / stages["memory copy"].gbps,
        },
        "timeline": timeline,
        "offered": offered,
        "summary": {"trains": summary.trains, "files": summary.files,
                    "events": summary.events, "problems": summary.problems,
                    "sender_cpu_s": round(sender_cpu, 2),
                    "peak_rss_mb": round(
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)},
    }
    from calstream.benchmark.report import scaling

    report["scaling"] = scaling(report, cores_per_node=options.node_cores,
                                processes_per_node=options.processes_per_node,
                                targets=options.targets_gbps)
    return report
