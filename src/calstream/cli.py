"""The ``calstream`` command: run | simulate | constants | events | check | bench."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CalstreamError, ConfigError

__all__ = ["main"]

log = logging.getLogger("calstream")

EXIT_ERROR = 2
EXIT_UNSTORED = 3
EXIT_DRAIN_TIMEOUT = 4


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``calstream`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except CalstreamError as exc:
        print(f"calstream: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`calstream check | head`): no traceback, and no second
        # BrokenPipeError when the interpreter flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calstream",
        description="Streaming calibration of European XFEL detector data.",
    )
    parser.add_argument("--version", action="version", version=f"calstream {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging threshold (default: info)",
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a pipeline (no CONFIG: the embedded demo)")
    run.add_argument("config", nargs="?", help="pipeline config (TOML)")
    run.add_argument("--max-trains", type=int, help="stop after N trains")
    run.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config key (repeatable)",
    )
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check", help="validate a config and print it resolved")
    check.add_argument("config", nargs="?")
    check.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    check.set_defaults(func=_cmd_check)

    sim = sub.add_parser("simulate", help="stream synthetic detector trains (Karabo Bridge 2.2)")
    sim.add_argument("--endpoint", default="tcp://*:45454", help="ZeroMQ endpoint to bind")
    sim.add_argument("--pattern", default="push", choices=["push", "pub", "rep"])
    sim.add_argument("--detector", default="jungfrau",
                     help="detector family: jungfrau, agipd, lpd, epix100 (the registry's)")
    sim.add_argument("--detector-id", default="", help="default: the detector's typical name")
    sim.add_argument("--modules", help="module numbers, e.g. 1,2 or 1-8 (default: the first)")
    sim.add_argument("--cells", type=int,
                     help="frames per train (default: JUNGFRAU 16, AGIPD/LPD 64, ePix100 1)")
    sim.add_argument("--gain-mode", default="bits", choices=["bits", "array"],
                     help="JUNGFRAU: gain in bits 14-15 of data.adc or in data.gain")
    sim.add_argument("--style", default="file", choices=["file", "online"],
                     help="AGIPD: image.data (frames, 2, ss, fs) or image.data + image.gain")
    sim.add_argument("--rate", type=float, default=10.0, help="trains/s (0: as fast as possible)")
    sim.add_argument("--trains", type=int, help="stop after N trains (default: forever)")
    sim.add_argument("--first-train-id", type=int, default=10000)
    sim.add_argument(
        "--constants", help="constants file template with {module}: offsets to simulate around"
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.set_defaults(func=_cmd_simulate)

    const = sub.add_parser("constants", help="calibration constants")
    const_sub = const.add_subparsers(required=True, metavar="ACTION")
    synth = const_sub.add_parser("synth", help="write synthetic constants in the facility layout")
    synth.add_argument(
        "--detector", default="jungfrau", choices=["jungfrau", "agipd", "lpd", "epix100"]
    )
    synth.add_argument(
        "--cells", type=int, help="memory cells (default 16, ePix100 1; JUNGFRAU 1 or 16)"
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("-o", "--output", required=True, help="HDF5 file to write")
    synth.set_defaults(func=_cmd_constants_synth)

    events = sub.add_parser("events", help="storage events")
    events_sub = events.add_subparsers(required=True, metavar="ACTION")
    lst = events_sub.add_parser("list", help="print the events in a spool's outbox")
    lst.add_argument("spool", help="spool directory (or the outbox .sqlite file)")
    lst.add_argument("--state", choices=["pending", "sent"])
    lst.add_argument("-v", "--verbose", action="store_true", help="print each event's JSON")
    lst.set_defaults(func=_cmd_events_list)
    _add_event_commands(events_sub, sub)
    _add_bench_command(sub)
    return parser


def _add_bench_command(sub: Any) -> None:
    bench = sub.add_parser(
        "bench", help="measure sustained rate, latency, stages alone and a baseline; report"
    )
    bench.add_argument("config", nargs="?", help="pipeline config (TOML) to measure")
    bench.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    bench.add_argument("--quick", action="store_true", help="short phases (CI-sized)")
    bench.add_argument("-o", "--out", default="bench-report",
                       help="directory for report.json, report.md and the PNGs")
    bench.add_argument("--root", help="where spool and data go (default /dev/shm/calstream-bench)")
    bench.add_argument("--destination", help="output.destination (default file://ROOT/data)")
    bench.add_argument("--start-rate", type=float, help="first ramp step, trains/s")
    bench.add_argument("--step-seconds", type=float, help="seconds per ramp step")
    bench.add_argument("--latency-fraction", type=float, help="fixed rate / sustained (0.5)")
    bench.add_argument("--latency-seconds", type=float, help="length of the fixed-rate step")
    bench.add_argument("--node-cores", type=int, help="cores per node for scaling (32)")
    bench.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    bench.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import BenchOptions, run_bench, to_markdown, write_report

    given = {
        "root": args.root, "destination": args.destination, "start_hz": args.start_rate,
        "step_seconds": args.step_seconds, "latency_fraction": args.latency_fraction,
        "latency_seconds": args.latency_seconds, "node_cores": args.node_cores,
    }
    kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    kwargs.update(config=args.config, overrides=tuple(args.set))
    options = BenchOptions.quick_options(**kwargs) if args.quick else BenchOptions(**kwargs)
    report = run_bench(options)
    paths = write_report(report, Path(args.out), plots=not args.no_plots)
    print(to_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _add_event_commands(events_sub: Any, sub: Any) -> None:
    """``events tail | replay | publish`` and ``ship`` (the Kafka side of storage events)."""
    tail = events_sub.add_parser("tail", help="pretty-print storage events live from Kafka")
    tail.add_argument("--kafka", metavar="HOST:PORT", help="bootstrap server(s), comma-separated")
    tail.add_argument("--topic", help="topic (default: the config's, or calstream.storage)")
    tail.add_argument("--config", help="take brokers, topic and security from [events.kafka]")
    tail.add_argument("--from-beginning", action="store_true", help="not only new events")
    tail.add_argument("-n", "--count", type=int, help="exit after N events")
    tail.add_argument("--idle", type=float, default=0.0, help="exit after S quiet seconds")
    tail.add_argument("-v", "--verbose", action="store_true", help="print each event's JSON")
    tail.set_defaults(func=_cmd_events_tail)

    replay = events_sub.add_parser(
        "replay", help="mark events recorded since a time pending again (same ids)"
    )
    replay.add_argument("spool", help="spool directory (or the outbox .sqlite file)")
    replay.add_argument("--since", required=True, metavar="ISO-TIME",
                        help="e.g. 2026-12-01T08:00 (local time unless it has an offset)")
    replay.set_defaults(func=_cmd_events_replay)

    publish = events_sub.add_parser(
        "publish", help="publish a config's pending events to its [events.kafka] and exit"
    )
    publish.add_argument("config", help="pipeline config (TOML) with [events.kafka]")
    publish.add_argument("--timeout", type=float, default=60.0, help="give up after S seconds")
    publish.set_defaults(func=_cmd_events_publish)

    ship = sub.add_parser(
        "ship", help="copy every announced file to [ship] destination (a Kafka consumer group)"
    )
    ship.add_argument("config", help="TOML with [events.kafka] and [ship]")
    ship.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ship.set_defaults(func=_cmd_ship)


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .pipeline import Pipeline

    config = load_config(args.config, args.set)
    pipeline = Pipeline(config)
    _install_signal_handlers(pipeline.stop, config.pipeline.drain_timeout)
    summary = pipeline.run(max_trains=args.max_trains)
    print(summary.format())
    if summary.unstored_files:
        log.error(
            "%d file(s) could not be stored; they stay in %s and are stored at the next start",
            summary.unstored_files, config.output.spool,
        )
        return EXIT_UNSTORED
    return 0


def _install_signal_handlers(stop: Any, drain_timeout: float | None = None) -> None:
    """SIGINT/SIGTERM: ``stop()`` and let the pipeline drain; a second signal, or a drain
    longer than ``drain_timeout`` seconds, exits at once.

    Exiting at once leaves nothing half-done where a consumer could see it: open files stay in
    the spool's ``building/`` (moved to ``failed/`` at the next start), a copy in progress
    only ever has a hidden ``.part`` name at the destination, and the outbox is a SQLite
    transaction log.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    received = []

    def hard_exit(code: int, why: str) -> None:
        log.error("%s: exiting now; open files stay in the spool for the next start", why)
        logging.shutdown()
        os._exit(code)

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if received:
            hard_exit(128 + signum, f"second {name}")
        received.append(signum)
        log.warning(
            "%s: stopping; draining queues and storing open files (again to exit at once%s)",
            name, f"; at most {drain_timeout:g} s" if drain_timeout else "",
        )
        if drain_timeout:
            timer = threading.Timer(
                drain_timeout, hard_exit,
                (EXIT_DRAIN_TIMEOUT, f"draining took longer than {drain_timeout:g} s "
                 "(pipeline.drain_timeout)"),
            )
            timer.daemon = True
            timer.start()
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _cmd_check(args: argparse.Namespace) -> int:
    from .config import load_config
    from .startup import check_constants_present
    from .store.destinations import check_destination_url

    config = load_config(args.config, args.set)
    check_constants_present(config)
    try:
        check_destination_url(config.output.destination)
    except ConfigError as exc:
        raise ConfigError(exc.message, source=config.path, key=exc.key) from None
    print(f"# {config.path}: valid")
    for section, values in config.to_dict().items():
        print(f"[{section}]")
        for key, value in values.items():
            print(f"{key} = {_toml_value(value)}")
        print()
    return 0


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def _parse_modules(text: str) -> tuple[int, ...]:
    modules: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            modules.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise SystemExit(
            f"calstream: error: --modules: expected e.g. 1,2 or 1-8, got {text!r}"
        ) from None
    return tuple(modules)


def _cmd_simulate(args: argparse.Namespace) -> int:
    import tempfile

    from .calibrate import get_detector, load_constants, synth_constants
    from .ingest import Sender, make_simulation, run_sender

    try:
        spec = get_detector(args.detector)
    except ConfigError as exc:
        raise ConfigError(exc.message, key="--detector") from None
    modules = _parse_modules(args.modules or str(spec.first_module))
    cells = args.cells or spec.default_cells
    spec.check_cells(cells, key="--cells")
    consts = None
    if args.constants:
        consts = {m: load_constants(spec.name, Path(args.constants.format(module=m)), cells=cells)
                  for m in modules}
    elif spec.name != "jungfrau":
        # The trains are drawn around constants: without a file, synthetic ones (seed = module,
        # as the demo pipeline writes them).
        with tempfile.TemporaryDirectory() as tmp:
            consts = {m: load_constants(spec.name, synth_constants(
                spec.name, Path(tmp) / f"{m}.h5", cells=cells, seed=m), cells=cells)
                for m in modules}
    simulation = make_simulation(
        spec.name, modules=modules, cells=cells, constants=consts, gain_mode=args.gain_mode,
        style=args.style, detector_id=args.detector_id, seed=args.seed,
    )
    stop = threading.Event()
    _install_signal_handlers(stop.set)
    log.info(
        "sending %s %s trains of %d module(s) x %d cells (%.1f MB each) on %s (%s) at %s",
        args.trains or "endless", spec.name, len(modules), cells,
        simulation.nbytes_per_train / 1e6,
        args.endpoint, args.pattern, f"{args.rate} Hz" if args.rate else "full speed",
    )
    with Sender(args.endpoint, args.pattern, bind=True) as sender:
        stats = run_sender(
            sender, simulation, n_trains=args.trains, rate_hz=args.rate or None,
            first_train_id=args.first_train_id, stop=stop,
        )
    print(
        f"sent {stats.trains} trains, {stats.bytes / 1e9:.3f} GB in {stats.seconds:.1f} s "
        f"({stats.bytes / max(stats.seconds, 1e-9) / 1e9:.2f} GB/s)"
    )
    return 0


def _cmd_constants_synth(args: argparse.Namespace) -> int:
    from .calibrate import get_detector, synth_constants

    spec = get_detector(args.detector)
    cells = args.cells if args.cells is not None else min(16, spec.max_cells)
    allowed = (1, 16) if spec.name == "jungfrau" else range(1, spec.max_cells + 1)
    if cells not in allowed:
        raise ConfigError(
            f"{spec.name} has {'1 or 16' if spec.name == 'jungfrau' else f'1 to {spec.max_cells}'}"
            f" memory cells. Got {cells} instead.",
            key="--cells",
        )
    path = synth_constants(spec.name, Path(args.output), cells=cells, seed=args.seed)
    print(f"wrote synthetic {spec.name} constants ({cells} cells) to {path}")
    return 0


def _outbox_path(spool: str) -> Path:
    from .events import OUTBOX_FILENAME

    path = Path(spool)
    if path.is_dir():
        path = path / OUTBOX_FILENAME
    if not path.exists():
        raise CalstreamError(f"no outbox at {path}")
    return path


def _cmd_events_list(args: argparse.Namespace) -> int:
    from .events import Outbox, format_entries

    outbox = Outbox(_outbox_path(args.spool), readonly=True)
    try:
        entries = outbox.entries(state=args.state)
        print(format_entries(entries, verbose=args.verbose))
        counts = outbox.counts()
        print(f"{sum(counts.values())} events: " + ", ".join(
            f"{n} {state}" for state, n in counts.items()))
    finally:
        outbox.close()
    return 0


def _cmd_events_tail(args: argparse.Namespace) -> int:
    import dataclasses

    from .config import KafkaConfig, load_config
    from .errors import ConfigError
    from .events.tail import tail_events

    kafka = load_config(args.config).events.kafka if args.config else KafkaConfig()
    changes: dict[str, Any] = {}
    if args.kafka:
        changes["bootstrap_servers"] = tuple(s.strip() for s in args.kafka.split(","))
    if args.topic:
        changes["topic"] = args.topic
    kafka = dataclasses.replace(kafka, **changes)
    try:
        kafka.check()
    except ConfigError as exc:
        raise ConfigError(exc.message, source="events tail", key=exc.key) from None
    if not kafka.enabled:
        raise ConfigError("give --kafka HOST:PORT or a --config with [events.kafka]",
                          source="events tail")
    if log.getEffectiveLevel() > logging.DEBUG:  # the events are the output, not group chatter
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
    stop = threading.Event()
    _install_signal_handlers(stop.set)
    tail_events(
        kafka, lambda line: print(line, flush=True), from_beginning=args.from_beginning,
        count=args.count, idle_timeout=args.idle, verbose=args.verbose, stop=stop,
    )
    return 0


def _cmd_events_replay(args: argparse.Namespace) -> int:
    from datetime import datetime

    from .errors import ConfigError
    from .events import Outbox

    try:
        since = datetime.fromisoformat(args.since)
    except ValueError:
        raise ConfigError(
            f"must be an ISO time like 2026-12-01T08:00. Got {args.since!r}.", key="--since"
        ) from None
    with Outbox(_outbox_path(args.spool)) as outbox:
        n = outbox.mark_pending(since)
        pending = outbox.counts()["pending"]
    print(
        f"{n} event(s) since {since.isoformat()} marked pending again ({pending} pending in all);"
        " the relay of a running pipeline, the next `calstream run` or `calstream events "
        "publish CONFIG` sends them with their original event ids"
    )
    return 0


def _cmd_events_publish(args: argparse.Namespace) -> int:
    from .config import load_config
    from .errors import ConfigError
    from .events import OUTBOX_FILENAME, KafkaPublisher

    config = load_config(args.config)
    if not config.events.kafka.enabled:
        raise ConfigError("has no [events.kafka] bootstrap_servers", source=config.path,
                          key="events.kafka.bootstrap_servers")
    outbox = Path(config.events.outbox or Path(config.output.spool) / OUTBOX_FILENAME)
    publisher = KafkaPublisher(config.events.kafka, _outbox_path(str(outbox)))
    publisher.start()
    try:
        pending = publisher.flush(args.timeout)
        published = publisher.stats().published
    finally:
        publisher.stop()
    print(f"{published} event(s) published, {pending} pending")
    return 0 if pending == 0 else EXIT_UNSTORED


def _cmd_ship(args: argparse.Namespace) -> int:
    from .config import load_config
    from .ship import Shipper

    config = load_config(args.config, args.set)
    shipper = Shipper(config.events.kafka, config.ship,
                      source=config.ship.source_webdav_settings(config.output))
    _install_signal_handlers(shipper.stop)
    summary = shipper.run()
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
