"""Wires the stages together: ingest → calibrate → store → events.

Threads and the bounded queues between them::

    receivers ──parts──► assembler ──work──► workers (N) ──results──► writer ──files──► storer
    1 per endpoint,      main thread:        correct +        reorder,          destination,
    decode               group by train,     compress         append chunks,    outbox, spool
                         check module data   (GIL released)   roll over files   clean-up

``parts`` and ``work`` are :class:`~calstream.queues.StageQueue` s with the configured overflow
policy (``pipeline.overflow``: block, drop-oldest, drop-newest); every drop is counted and
logged with its train id. ``results`` is bounded by the slab pool, the assembler by its
``max_pending``, the sockets by their high-water marks: memory stays bounded at any input rate.

Trains are numbered as they leave the work queue; the writer puts results back in that order,
so the files' train ids always increase whatever order the workers finish in. A module whose
data is missing (the assembler waited ``pipeline.assembly_timeout`` for it) or malformed in a
train is written as a gap (INDEX count 0), counted and logged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .calibrate import load_constants, make_corrector, synth_constants
from .config import Config, OutputConfig
from .errors import (
    CalstreamError,
    ConfigError,
    ConstantsError,
    DataError,
    ProtocolError,
    StoreError,
)
from .events import EventSettings, KafkaPublisher, Outbox, build_storage_event
from .ingest import (
    AssembledTrain,
    Receiver,
    Sender,
    TrainAssembler,
    make_simulation,
    run_sender,
)
from .metrics import MetricsServer, RunSummary, Stats, StatusLine
from .preview import PreviewPublisher
from .queues import CLOSED, StageQueue
from .startup import check_constants_present, check_destination_writable, check_spool_space
from .store import (
    FileInfo,
    SequenceWriter,
    Spool,
    layout_for,
    open_destination,
    parse_codec,
    read_file_info,
)
from .store.bitround import bitround
from .store.retry import RetryQueue
from .store.spool import SpoolLimit, parse_corr_filename

__all__ = ["Pipeline"]

log = logging.getLogger(__name__)

_ROLES = ("data", "gain", "mask")  # the corrector's outputs, in the file layout's image order
_STOP = object()
#: How long an idle storer waits for a new file before it looks at the files to retry.
_RETRY_POLL = 0.2
_SENDER_PATTERN = {"pull": "push", "sub": "pub", "req": "rep"}


@dataclass
class ModuleInput:
    """One module's raw data in one train (views on the received ZeroMQ frames), checked.

    ``data`` is what the corrector's ``correct_module`` takes (registry keys); ``small`` the
    per-frame values written beside the images (JUNGFRAU ``memoryCell``, ``frameNumber``;
    AGIPD/LPD ``cellId``, ``pulseId``).
    """

    data: dict[str, np.ndarray]
    frames: int
    small: dict[str, np.ndarray]
    nbytes: int


@dataclass
class _Part:
    """One received message, before assembly."""

    endpoint: int
    data: dict[str, Any]
    metadata: dict[str, Any]


@dataclass
class TrainWork:
    seq: int
    train_id: int
    timestamp_ns: int
    modules: dict[int, ModuleInput]
    nbytes: int
    received: float = 0.0


@dataclass
class TrainResult:
    seq: int
    train_id: int
    timestamp_ns: int
    slab: np.ndarray
    chunks: dict[int, dict[str, list[np.ndarray]]] = field(default_factory=dict)
    small: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    frames: int = 0
    received: float = 0.0
    preview: dict[str, dict[str, Any]] = field(default_factory=dict)


class SlabPool:
    """A fixed set of byte buffers that hold one train's encoded chunks, reused forever.

    Encoding into fresh ``bytes`` costs a page fault per 4 KiB of output on first touch; a
    slab is touched once and then recycled by the writer. A worker takes one slab per train
    before it starts, so the train the writer waits for always has its slab (no deadlock);
    when all slabs are in flight, workers wait, which bounds memory.
    """

    def __init__(self, count: int, nbytes: int) -> None:
        self.count = count
        self.nbytes = nbytes
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(np.empty(nbytes, np.uint8))

    def get(self, timeout: float | None = None) -> np.ndarray:
        """A free slab; waits for one (raises ``queue.Empty`` after ``timeout`` s)."""
        return self._free.get(timeout=timeout)

    def put(self, slab: np.ndarray) -> None:
        self._free.put(slab)


class Pipeline:
    """One calstream process: receive, correct, write, store and announce.

    Parameters
    ----------
    config
        A validated :class:`~calstream.config.Config`.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stats = Stats()
        self._stop = threading.Event()
        self._failed = threading.Event()
        self._train_floor = 0
        self._threads: list[threading.Thread] = []
        self._max_trains: int | None = None
        self._errors: list[BaseException] = []
        self._receiving = threading.Event()
        self._unknown_sources: set[str] = set()
        self._preview: PreviewPublisher | None = None
        self._assembler: TrainAssembler | None = None
        self._queues: dict[str, Any] = {}
        self.name = config.pipeline.name

        # Constants first: a missing or mis-shaped constant is the likeliest start-up error,
        # and it must stop us before the spool, the outbox or any socket exists.
        self.spec = config.source.spec
        self.constants = self._load_constants()
        out = config.output
        cal = config.calibration
        options: dict[str, Any] = {"photon_energy": cal.photon_energy or None}
        if self.spec.common_mode:
            options.update(common_mode=cal.common_mode, cm_threshold=cal.cm_threshold)
        self.correctors = {
            module: make_corrector(self.spec.name, consts, cal.backend, **options)
            for module, consts in self.constants.items()
        }
        self.output_dtypes = dict(
            zip(_ROLES, next(iter(self.correctors.values())).output_dtypes.values(), strict=True)
        )
        self.layout = layout_for(self.spec.exdf_layout, self.output_dtypes["data"])
        # Codecs by output role ("adc" is JUNGFRAU's name for the data), then by file dataset.
        # A role the config leaves out gets its default codec.
        specs = {
            ("data" if key == "adc" else key): text
            for key, text in {**OutputConfig().compression, **out.compression}.items()
        }
        self.codecs = {role: parse_codec(specs[role]) for role in _ROLES}
        self.file_codecs = {
            name: self.codecs[role]
            for role, name in zip(_ROLES, self.layout.image_names, strict=True)
        }
        try:
            self.destination = open_destination(out.destination, out.webdav_settings())
            check_destination_writable(self.destination)
        except (ConfigError, StoreError) as exc:
            raise ConfigError(exc.message, source=config.path, key="output.destination") from None
        self.spool = Spool(Path(out.spool), retention=out.retention)
        self.spool_limit = SpoolLimit(self.spool, out.spool_limit_bytes, out.overflow)
        check_spool_space(
            Path(out.spool), self._slab_bytes() * out.trains_per_file
        )
        if config.events.outbox:
            self.outbox = Outbox(config.events.outbox)
        else:
            self.outbox = Outbox.in_spool(out.spool)
        settings: dict[str, Any] = {"cell_name": config.events.cell_name}
        if config.events.cell_domain:
            settings["cell_domain"] = config.events.cell_domain
        if config.events.storage_info:
            settings["storage_info"] = config.events.storage_info
        self.event_settings = EventSettings(**settings)
        kafka = config.events.kafka
        self.publisher = (
            KafkaPublisher(kafka, self.outbox.path, name=self.name) if kafka.enabled else None
        )

    # -- set-up -------------------------------------------------------------------------------

    def _load_constants(self) -> dict[int, Any]:
        cal = self.config.calibration
        detector = self.spec.name
        check_constants_present(self.config)
        loaded: dict[int, Any] = {}
        by_path: dict[Path, Any] = {}
        for module in self.config.source.modules:
            path = cal.constants_path(module)
            if not path.exists() and cal.synthesize_missing:
                log.warning(
                    "constants file %s not found: writing synthetic %s constants "
                    "(calibration.synthesize_missing = true; never use these for real data)",
                    path, detector,
                )
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    synth_constants(detector, path, cells=cal.cells, seed=module)
                except OSError as exc:
                    raise ConstantsError(
                        f"cannot write synthetic constants: {exc.strerror or exc}",
                        source=str(path), key="calibration.constants",
                    ) from None
            if path not in by_path:
                try:
                    by_path[path] = load_constants(detector, path, cells=cal.cells)
                except ConstantsError as exc:
                    if "cells" not in exc.message:
                        raise
                    raise ConstantsError(
                        f"{exc.message} (calibration.cells = {cal.cells}; point "
                        "calibration.constants at constants for that many cells, or delete "
                        "the file if it is a synthetic one from an earlier demo)",
                        source=exc.source, key=exc.key,
                    ) from None
            loaded[module] = by_path[path]
        return loaded

    def stop(self) -> None:
        """Ask the pipeline to stop receiving, drain what it has and finish (thread-safe)."""
        self._stop.set()

    # -- run ----------------------------------------------------------------------------------

    def run(self, max_trains: int | None = None) -> RunSummary:
        """Run until ``max_trains`` trains are accepted, the stream goes idle, or :meth:`stop`."""
        cfg = self.config
        self._max_trains = max_trains
        if self._max_trains is None and cfg.simulate.enabled:
            self._max_trains = cfg.simulate.trains
        for corrector in self.correctors.values():
            corrector.warmup()

        endpoints = cfg.source.all_endpoints
        policy = cfg.pipeline.overflow
        parts_q: StageQueue[_Part] = StageQueue(
            cfg.pipeline.queue_size * len(endpoints), policy, on_drop=self._dropped
        )
        work_q: StageQueue[TrainWork] = StageQueue(
            cfg.pipeline.queue_size, policy, on_drop=self._dropped
        )
        # Bounded by the slab pool: a worker needs a free slab before it takes on a train.
        result_q: queue.Queue[Any] = queue.Queue()
        self._slabs = SlabPool(2 * cfg.pipeline.workers + 2, self._slab_bytes())
        file_q: queue.Queue[Any] = queue.Queue()
        self._queues = {"parts": parts_q, "work": work_q, "results": result_q, "files": file_q}

        recovered = self.spool.recover()
        # Train ids this run already has in earlier sequence files: writing them again would
        # make the run unreadable ("same train ID in different files").
        floor = max(self.spool.last_train_ids(cfg.output.run).values(), default=0)
        for path in recovered:
            try:
                info = read_file_info(path)
            except CalstreamError as exc:
                log.error(
                    "%s: cannot read spooled file %s, left in place: %s", self.name, path, exc
                )
                continue
            log.info("%s: storing %s left complete by an earlier run", self.name, info.relpath)
            floor = max(floor, info.last_train)
            file_q.put(info)
        self._train_floor = floor

        receivers: list[Receiver] = []
        services: list[Any] = []
        try:
            for endpoint in endpoints:
                receivers.append(Receiver(
                    endpoint, cfg.source.pattern, bind=cfg.source.bind,
                    max_array_bytes=self._max_array_bytes(),
                ))
            if cfg.metrics.port:
                services.append(MetricsServer(self.stats, self._gauges,
                                              port=cfg.metrics.port, host=cfg.metrics.host))
            if cfg.preview.endpoint:
                self._preview = PreviewPublisher(
                    cfg.preview.endpoint, cfg.preview.pattern, every=cfg.preview.every,
                    max_rate=cfg.preview.max_rate,
                )
                services.append(self._preview)
        except BaseException:
            for item in [*receivers, *services]:
                item.close()
            raise
        self._status = StatusLine(
            self.name, self.stats, self._backlog, mode=cfg.metrics.status,
            log_every=cfg.pipeline.log_every,
        )
        sender_thread = self._start_simulation(floor) if cfg.simulate.enabled else None

        started = time.monotonic()
        if self.publisher is not None:
            self.publisher.start()  # returns at once; events wait in the outbox for the broker
        # Several storers: uploads to a WebDAV door overlap (each waits on the network).
        self._retries: RetryQueue[tuple[FileInfo, str]] = RetryQueue(cfg.output.retry_unstored)
        self._storers_left = cfg.output.uploads
        self._storers_lock = threading.Lock()
        self._remove_stale_parts()
        for i in range(cfg.output.uploads):
            self._spawn(f"storer-{i}", self._store_loop, file_q)
        self._spawn("writer", self._write_loop, result_q, file_q, cfg.pipeline.workers)
        for i in range(cfg.pipeline.workers):
            self._spawn(f"worker-{i}", self._work_loop, work_q, result_q)
        self._receiving.set()
        receiver_threads = [
            self._spawn(f"receiver-{i}", self._receive_loop, i, receiver, parts_q)
            for i, receiver in enumerate(receivers)
        ]
        try:
            self._assemble_loop(parts_q, work_q, sender_thread)
        finally:
            self._receiving.clear()
            for thread in receiver_threads:
                thread.join()
            for receiver in receivers:
                receiver.close()
            work_q.close()  # workers drain it, then stop
            for thread in self._threads:
                while thread.is_alive():
                    thread.join(0.5)
            if sender_thread is not None:
                self._stop.set()
                sender_thread.join(timeout=5)
            if self.publisher is not None:
                self._stop_publisher(self.publisher)
            self._status.close()
            for service in services:
                service.close()
            self.outbox.close()
            close = getattr(self.destination, "close", None)
            if close is not None:
                close()
        seconds = time.monotonic() - started
        if self._errors:
            raise self._errors[0]
        return self._summary(seconds)

    def _offer(self, q: StageQueue[Any], item: Any, keep_going: threading.Event) -> bool:
        """Put into a stage queue; with ``block``, wait while ``keep_going`` and no thread failed.

        Returns False when the item did not go in (dropped by the policy, or given up on).
        """
        while True:
            if q.put(item, timeout=0.5):
                return True
            if q.policy != "block":
                return False  # dropped; on_drop counted and logged it
            if self._failed.is_set() or not keep_going.is_set():
                return False

    def _dropped(self, item: Any, reason: str) -> None:
        """A stage queue's overflow policy dropped ``item``: count it and say which train."""
        policy = self.config.pipeline.overflow
        if isinstance(item, _Part):
            train_id, what, queue_name = _train_id(item.metadata), "parts", "parts"
            sources = sorted(item.data)
        else:
            train_id, what, queue_name = item.train_id, "trains", "work"
            sources = [self.config.source.source_name(m) for m in item.modules]
        self.stats.add(f"dropped_{what}")
        self.stats.add("dropped", queue=queue_name, reason=policy)
        log.warning("%s: train %s dropped (%s queue full, pipeline.overflow = %s; sources %s)",
                    self.name, train_id, queue_name, policy, ", ".join(sources) or "none")

    def _reject(self, counter: str, reason: str, message: str, *args: Any) -> None:
        """Count one piece of unusable input (``counter`` and ``rejected{reason}``) and log it."""
        self.stats.add(counter)
        self.stats.add("rejected", reason=reason)
        log.error("%s: " + message, self.name, *args)

    def _get(self, q: queue.Queue[Any] | SlabPool) -> Any:
        """Take from a queue; ``_STOP`` once a pipeline thread has failed."""
        while True:
            try:
                return q.get(timeout=0.5)
            except queue.Empty:
                if self._failed.is_set():
                    return _STOP

    def _get_work(self, q: StageQueue[TrainWork]) -> Any:
        """``(seq, work)`` from the work queue; ``_STOP`` once it is closed or a thread failed."""
        while True:
            item = q.get(timeout=0.5)
            if item is CLOSED:
                return _STOP
            if item is not None:
                return item
            if self._failed.is_set():
                return _STOP

    def _spawn(self, name: str, target: Any, *args: Any) -> threading.Thread:
        def guarded() -> None:
            try:
                target(*args)
            except BaseException as exc:
                log.exception("%s: %s thread failed", self.name, name)
                self._errors.append(exc)
                self._failed.set()
                self._stop.set()

        thread = threading.Thread(target=guarded, name=f"calstream-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def _start_simulation(self, floor: int) -> threading.Thread:
        cfg = self.config
        sim_cfg = cfg.simulate
        simulation = make_simulation(
            self.spec.name,
            modules=cfg.source.modules,
            cells=cfg.calibration.cells,
            constants=self.constants,
            sources={m: cfg.source.source_name(m) for m in cfg.source.modules},
            gain_mode=sim_cfg.gain_mode,
            seed=sim_cfg.seed,
        )
        try:
            sender = Sender(
                cfg.source.endpoint, _SENDER_PATTERN[cfg.source.pattern],
                bind=not cfg.source.bind,
            )
        except ConfigError as exc:
            # most often a second demo or a `calstream simulate` holds the port
            raise ConfigError(
                f"the in-process simulator (simulate.enabled = true) {exc.message}; stop what "
                "holds the port or choose another endpoint",
                source=cfg.path, key="source.endpoint",
            ) from None

        def send() -> None:
            if sender.pattern == "pub":
                # PUB drops what it sends before the subscriber has joined (slow joiner).
                self._stop.wait(0.5)
            with sender:
                stats = run_sender(
                    sender,
                    simulation,
                    n_trains=sim_cfg.trains,
                    rate_hz=sim_cfg.rate or None,
                    # A restarted run continues after the trains it already has.
                    first_train_id=max(sim_cfg.first_train_id, floor + 1),
                    stop=self._stop,
                )
            log.info("simulation sent %d trains (%.2f GB)", stats.trains, stats.bytes / 1e9)

        thread = threading.Thread(target=send, name="calstream-simulate", daemon=True)
        thread.start()
        return thread

    # -- stages -------------------------------------------------------------------------------

    def _max_array_bytes(self) -> int:
        """Largest array the decoder accepts: a module's data, with room for other sources."""
        # analog + digital (AGIPD file style) is the largest raw array a module sends
        module = self.config.calibration.cells * int(np.prod(self.spec.module_shape)) * 4
        return max(4 * module, 64 << 20)

    def _receive_loop(self, index: int, receiver: Receiver, parts_q: StageQueue[_Part]) -> None:
        endpoint = receiver.endpoint
        while self._receiving.is_set():
            try:
                message = receiver.receive(timeout=0.2)
            except ProtocolError as exc:
                self._reject("rejected_messages", "malformed",
                             "rejected message from %s: %s", endpoint, exc)
                continue
            if message is None:
                continue
            data, metadata = message
            self._offer(parts_q, _Part(index, data, metadata), self._receiving)

    def _assemble_loop(
        self,
        parts_q: StageQueue[_Part],
        work_q: StageQueue[TrainWork],
        sender_thread: threading.Thread | None = None,
    ) -> None:
        cfg = self.config
        idle = cfg.source.idle_timeout
        assembler = self._assembler = TrainAssembler(
            [cfg.source.source_name(m) for m in cfg.source.modules],
            n_endpoints=len(cfg.source.all_endpoints),
            timeout=cfg.pipeline.assembly_timeout,
            max_pending=2 * cfg.pipeline.queue_size + 2,
            floor=self._train_floor,
            max_jump=cfg.pipeline.max_train_jump,
        )
        accepted = 0
        previous = [0]  # train id accepted last in this process
        last_data = time.monotonic()
        keep_going = threading.Event()
        keep_going.set()
        log.info(
            "%s: receiving %s (%s) for modules %s",
            self.name, ", ".join(cfg.source.all_endpoints), cfg.source.pattern,
            list(cfg.source.modules),
        )

        def submit(trains: list[AssembledTrain]) -> None:
            nonlocal accepted
            for train in trains:
                if self._max_trains is not None and accepted >= self._max_trains:
                    return
                work = self._accept(train)
                if previous[0] and train.train_id > previous[0] + 1:
                    self.stats.add("train_ids_skipped", train.train_id - previous[0] - 1)
                previous[0] = train.train_id
                accepted += 1
                self.stats.add("trains_in")
                self.stats.add("bytes_in", work.nbytes)
                self._offer(work_q, work, keep_going)

        while not self._stop.is_set():
            if self._max_trains is not None and accepted >= self._max_trains:
                break
            self._status.tick()
            item = parts_q.get(timeout=0.1)
            now = time.monotonic()
            if item is None or item is CLOSED:
                submit(assembler.expire(now))
                quiet = now - last_data
                if idle and accepted and quiet > idle:
                    log.info("%s: no data for %.1f s, stopping", self.name, idle)
                    break
                if sender_thread is not None and not sender_thread.is_alive() and quiet > 2.0:
                    log.info("%s: the simulation has finished; stopping", self.name)
                    break
                continue
            last_data = now
            submit(self._assemble(assembler, item[1], now))
        # The stream has ended: trains still waiting for parts go on with what they have.
        if not self._failed.is_set():
            submit(assembler.flush())

    def _assemble(
        self, assembler: TrainAssembler, part: _Part, now: float
    ) -> list[AssembledTrain]:
        train_id = _train_id(part.metadata)
        if not train_id:
            self._reject("rejected_messages", "no-train-id",
                         "rejected message without a valid timestamp.tid (%r; sources %s)",
                         train_id, sorted(part.data))
            return assembler.expire(now)
        ready, rejections = assembler.add(part.endpoint, train_id, part.data, part.metadata, now)
        for r in rejections:
            sources = ", ".join(repr(s) for s in r.sources)
            if r.reason == "backwards":
                floor = assembler.last_emitted == self._train_floor
                self._reject(
                    "rejected_trains_backwards", r.reason,
                    "train %d rejected: train ids must increase (last written %d%s)",
                    train_id, assembler.last_emitted,
                    f" in run {self.config.output.run}" if floor else "",
                )
            elif r.reason == "jump":
                self._reject("rejected_train_id_jump", r.reason,
                             "train %d from %s rejected: %s", train_id, sources, r.detail)
            elif r.reason == "duplicate":
                self._reject("rejected_duplicates", r.reason, "train %d: %s %s",
                             train_id, sources, r.detail)
            else:
                # Not ours (another detector's source, or a name trying to escape a path):
                # never written; logged once per name so that a busy stream cannot flood.
                self.stats.add("ignored_sources", len(r.sources))
                self.stats.add("rejected", len(r.sources), reason=r.reason)
                new = [s for s in r.sources if s not in self._unknown_sources]
                if new:
                    self._unknown_sources.update(new)
                    log.warning("%s: train %d: ignoring source(s) %s: %s (logged once)",
                                self.name, train_id, ", ".join(repr(s) for s in new), r.detail)
        return ready

    def _accept(self, train: AssembledTrain) -> TrainWork:
        cfg = self.config
        train_id = train.train_id
        modules: dict[int, ModuleInput] = {}
        nbytes = 0
        for module in cfg.source.modules:
            source = cfg.source.source_name(module)
            if source not in train.data:
                self.stats.add("module_missing")
                log.warning("%s: train %d has no data from %s%s", self.name, train_id, source,
                            " (written as a gap)")
                continue
            try:
                item = self._module_input(source, train_id, train.data[source])
            except DataError as exc:
                self.stats.add("module_rejected")
                self.stats.add("rejected", reason="module-data")
                log.error("%s: %s", self.name, exc)
                continue
            modules[module] = item
            size = item.nbytes
            nbytes += size
            self.stats.add("source_trains_in", source=source)
            self.stats.add("source_bytes_in", size, source=source)
        timestamp_ns = _timestamp_ns(train.metadata)
        return TrainWork(-1, train_id, timestamp_ns, modules, nbytes, received=train.first_seen)

    def _module_input(self, source: str, train_id: int, values: dict[str, Any]) -> ModuleInput:
        """Check one module's data against the detector's registry entry (keys, dtype, shape,
        frames) and pick what the corrector and the file need; views, no copies."""
        spec = self.spec
        cells = self.config.calibration.cells

        def fail(message: str, key: str) -> DataError:
            return DataError(message, source=source, train_id=train_id, key=key)

        data_key = spec.file_layout.keys["data"]
        raw = values.get(data_key)
        if not isinstance(raw, np.ndarray):
            raise fail(f"missing array {data_key!r} (this source has: "
                       f"{', '.join(sorted(values))[:200] or 'nothing'})", data_key)
        if spec.max_cells == 1 and raw.shape == spec.module_shape:
            raw = raw[np.newaxis]  # one frame per train, sent without a frame axis
        styles = [name for name, layout in (("file", spec.file_layout),
                                            ("online", spec.online_layout))
                  if _fits(raw.shape, layout.axes[data_key], spec.module_shape)]
        if raw.dtype != np.uint16 or not styles:
            wanted = " or ".join(sorted({
                "(" + layout.axes[data_key].replace("ss", str(spec.module_shape[0]))
                .replace("fs", str(spec.module_shape[1])) + ")"
                for layout in (spec.file_layout, spec.online_layout)}))
            raise fail(f"expected uint16 {wanted}, got {raw.dtype} {raw.shape}", data_key)
        frames = int(raw.shape[0])
        if self.layout.per_frame:
            if not 1 <= frames <= cells:
                raise fail(f"{frames} frames; expected 1 to {cells} (calibration.cells)",
                           data_key)
        elif frames != (cells if self.layout.cell_axis else 1):
            raise fail(f"expected {cells} frames (calibration.cells), got {frames}", data_key)
        data = {data_key: raw}
        nbytes = raw.nbytes

        gain_key = spec.online_layout.keys.get("gain")
        gain_mode = self.config.source.gain_mode
        gain = values.get(gain_key) if gain_key else None
        if spec.name == "jungfrau":
            if gain_mode == "bits":
                gain = None
            elif gain_mode == "array" and gain is None:
                raise fail("missing array 'data.gain' (source.gain_mode = 'array')", "data.gain")
            if gain is not None and (not isinstance(gain, np.ndarray)
                                     or gain.dtype != np.uint8 or gain.shape != raw.shape):
                raise fail(f"expected uint8 {raw.shape}, got "
                           f"{getattr(gain, 'dtype', type(gain).__name__)} "
                           f"{getattr(gain, 'shape', '')}", "data.gain")
        elif gain_key and gain_key not in spec.file_layout.keys and styles == ["online"]:
            # online style: the gain (AGIPD's digital value) comes as its own array
            if not isinstance(gain, np.ndarray) or gain.shape != raw.shape:
                raise fail(f"{data_key} {raw.shape} is online style: expected {gain_key} of "
                           f"the same shape, got {getattr(gain, 'shape', gain)!r}", gain_key)
        else:
            gain = None
        if gain is not None and gain_key:
            data[gain_key] = gain
            nbytes += gain.nbytes

        small: dict[str, np.ndarray] = {}
        if spec.name == "jungfrau":
            memory_cell = _small_array(values, "data.memoryCell", cells, source, train_id)
            if memory_cell is None:
                memory_cell = np.arange(cells)
            if memory_cell.min() < 0 or memory_cell.max() > 255:
                raise fail(f"memory cells out of range: {memory_cell.tolist()}",
                           "data.memoryCell")
            frame_number = _small_array(values, "data.frameNumber", cells, source, train_id)
            if frame_number is None:
                frame_number = np.zeros(cells)
            data["data.memoryCell"] = memory_cell
            small = {"memoryCell": memory_cell.astype(np.uint8),
                     "frameNumber": frame_number.astype(np.uint64)}
        elif self.layout.per_frame:
            cell_key = spec.file_layout.keys["cell"]
            cell_id = _frame_values(values, cell_key, frames, source, train_id)
            if cell_id is None:
                if cells > 1:
                    raise fail(f"missing array {cell_key!r}: needed with {cells} memory cells",
                               cell_key)
                cell_id = np.zeros(frames, np.uint16)
            pulse_id = _frame_values(values, "image.pulseId", frames, source, train_id)
            data[cell_key] = cell_id
            small = {"cellId": cell_id.astype(np.uint16),
                     "pulseId": (np.arange(frames, dtype=np.uint64) if pulse_id is None
                                 else pulse_id.astype(np.uint64))}
        return ModuleInput(data, frames, small, nbytes)

    def _slab_bytes(self) -> int:
        """Bytes needed for the encoded chunks of one train of all modules, at worst."""
        npix = int(np.prod(self.spec.module_shape))
        per_frame = sum(
            self.codecs[role].max_encoded_size(npix * dt.itemsize, dt.itemsize)
            for role, dt in self.output_dtypes.items()
        )
        return per_frame * self.config.calibration.cells * len(self.config.source.modules)

    def _work_loop(self, work_q: queue.Queue[Any], result_q: queue.Queue[Any]) -> None:
        cells = self.config.calibration.cells
        # Per-worker output buffers (aligned, so the kernels can stream their stores), reused
        # for every train: chunks are encoded before the next train overwrites them.
        data, gain, mask = next(iter(self.correctors.values())).empty_outputs(cells)
        buffers = {"data": data, "gain": gain, "mask": mask}
        try:
            while True:
                # The slab first: the worker that holds the oldest train must never wait for
                # one, or the writer (waiting for that train) would never free any.
                slab = self._get(self._slabs)
                if slab is _STOP:
                    return
                item = self._get_work(work_q)
                if item is _STOP:
                    self._slabs.put(slab)
                    return
                seq, work = item
                work.seq = seq
                result_q.put(self._process(work, slab, buffers))
        finally:
            result_q.put(_STOP)  # always, or the writer would wait for this worker forever

    def _process(
        self, work: TrainWork, slab: np.ndarray, buffers: dict[str, np.ndarray]
    ) -> TrainResult:
        """Correct and compress one train's modules into ``slab``."""
        result = TrainResult(work.seq, work.train_id, work.timestamp_ns, slab,
                             received=work.received)
        # A few trains are copied for the live preview (the buffers are reused at once).
        preview = self._preview is not None and bool(work.modules) and self._preview.wants(
            work.train_id)
        used = 0
        for module, item in work.modules.items():
            source = self.config.source.source_name(module)
            t0 = time.perf_counter()
            # The first frames of the per-worker buffers (a leading slice stays contiguous).
            outs = {role: buf[: item.frames] for role, buf in buffers.items()}
            try:
                self.correctors[module].correct_module(
                    item.data, outs["data"], outs["gain"], outs["mask"],
                    source=source, train_id=work.train_id,
                )
                if self.config.output.bitround and outs["data"].dtype == np.float32:
                    bitround(outs["data"], self.config.output.bitround)
                t1 = time.perf_counter()
                chunks: dict[str, list[np.ndarray]] = {}
                for role, name in zip(_ROLES, self.layout.image_names, strict=True):
                    codec = self.codecs[role]
                    encoded = chunks[name] = []
                    for frame in outs[role]:
                        chunk = codec.encode_into(frame, result.slab[used:])
                        encoded.append(chunk)
                        used += chunk.nbytes
            except DataError as exc:
                self.stats.add("module_rejected")
                log.error("%s: %s", self.name, exc)
                continue
            except Exception:
                # A bug must not silently stall the writer: record a gap and go on.
                self.stats.add("module_failed")
                log.exception("%s: %s train %d failed", self.name, source, work.train_id)
                continue
            t2 = time.perf_counter()
            if preview:
                group = self.layout.group
                result.preview[self.config.output_source(module)] = {
                    **{self.spec.output_keys[role]: outs[role].copy() for role in _ROLES},
                    **{f"{group}.{name}": value for name, value in item.small.items()},
                }
            result.chunks[module] = chunks
            result.small[module] = item.small
            result.frames += item.frames
            self.stats.add("seconds_correct", t1 - t0)
            self.stats.add("seconds_compress", t2 - t1)
            self.stats.observe("stage_seconds", t1 - t0, stage="correct")
            self.stats.observe("stage_seconds", t2 - t1, stage="compress")
        return result

    def _write_loop(
        self, result_q: queue.Queue[Any], file_q: queue.Queue[Any], n_workers: int
    ) -> None:
        cfg = self.config
        writers = {
            module: SequenceWriter(
                self.spool,
                run=cfg.output.run,
                proposal=cfg.output.proposal,
                detector=self.spec.name,
                module=module,
                aggregator=cfg.output.aggregator,
                source=cfg.output_source(module),
                cells=cfg.calibration.cells,
                codecs=self.file_codecs,
                frame_shape=self.spec.module_shape,
                layout=self.layout,
                trains_per_file=cfg.output.trains_per_file,
                max_file_bytes=cfg.output.max_file_bytes,
                provenance={
                    "constants": self.constants[module].provenance,
                    "backend": cfg.calibration.backend,
                    # lossy: readers must know the data keep only these mantissa bits
                    **({"bitround": cfg.output.bitround}
                       if cfg.output.bitround and self.output_dtypes["data"] == np.float32
                       else {}),
                    **({"photon_energy": cfg.calibration.photon_energy}
                       if cfg.calibration.photon_energy else {}),
                    **({"common_mode": True, "cm_threshold": cfg.calibration.cm_threshold}
                       if cfg.calibration.common_mode else {}),
                },
            )
            for module in cfg.source.modules
        }
        pending: dict[int, TrainResult] = {}
        next_seq = 0
        stopped = 0
        try:
            while stopped < n_workers:
                item = self._get(result_q)
                if item is _STOP:
                    stopped += 1
                    continue
                pending[item.seq] = item
                if not self.spool_limit.wait(self._stop) and not self._stop.is_set():
                    self.stats.add("spool_full_stop")
                    self.stop()
                while next_seq in pending:
                    result = pending.pop(next_seq)
                    next_seq += 1
                    t0 = time.perf_counter()
                    try:
                        for module, writer in writers.items():
                            self._write_module(writer, module, result, file_q)
                    finally:
                        result.chunks.clear()  # no views of the slab may outlive it
                        self._slabs.put(result.slab)
                    t1 = time.perf_counter()
                    self.stats.add("seconds_write", t1 - t0)
                    self.stats.observe("stage_seconds", t1 - t0, stage="write")
                    if result.received:
                        self.stats.observe("latency_seconds", time.monotonic() - result.received)
                    self.stats.add("trains_written")
                    self.stats.add("frames_written", result.frames)
                    if result.preview and self._preview is not None:
                        self._publish_preview(result)
        finally:
            try:
                for module, writer in writers.items():
                    try:
                        info = writer.close()
                    except CalstreamError as exc:
                        self.stats.add("files_unstored")
                        log.error("%s: module %d: closing its file failed: %s",
                                  self.name, module, exc)
                        continue
                    if info is not None:
                        file_q.put(info)
            finally:
                file_q.put(_STOP)

    def _publish_preview(self, result: TrainResult) -> None:
        assert self._preview is not None
        self._preview.publish(result.train_id, result.preview, timestamp_ns=result.timestamp_ns)
        self.stats.add("preview_sent")
        result.preview = {}

    def _write_module(
        self, writer: SequenceWriter, module: int, result: TrainResult, file_q: queue.Queue[Any]
    ) -> None:
        try:
            closed = writer.write_train(
                result.train_id,
                result.timestamp_ns,
                result.chunks.get(module),
                result.small.get(module),
            )
        except CalstreamError as exc:
            self.stats.add("module_write_failed")
            log.error("%s: module %d train %d not written: %s",
                      self.name, module, result.train_id, exc)
            return
        chunks = result.chunks.get(module)
        if chunks:
            source = writer.source
            self.stats.add("source_trains_out", source=source)
            size = sum(c.nbytes for bufs in chunks.values() for c in bufs)
            self.stats.add("bytes_written", size)
            self.stats.add("source_bytes_out", size, source=source)
        for info in closed:
            file_q.put(info)

    def _store_loop(self, file_q: queue.Queue[Any]) -> None:
        # Not _get(): even after a failure, the files the writer closed are still stored.
        # New files first; a refused file whose back-off has passed after each new file, or
        # while no new file comes.
        while True:
            try:
                info = file_q.get(timeout=_RETRY_POLL)
            except queue.Empty:
                info = None
            if info is _STOP:
                file_q.put(_STOP)  # for the other storers
                break
            if info is not None:
                self._store_one(info)
            if (due := self._retries.take_due()) is not None:
                (info, _), attempts = due
                self._store_one(info, attempts)
        # The end: a last try for files refused before the destination took one again.
        while (final := self._retries.take_final()) is not None:
            (info, _), attempts = final
            self._store_one(info, attempts, final=True)
        with self._storers_lock:
            self._storers_left -= 1
            last = self._storers_left == 0
        if last:
            for (info, error), attempts in self._retries.drain():
                self._unstored(info, attempts, error)

    def _store_one(self, info: FileInfo, attempts: int = 0, *, final: bool = False) -> None:
        """Store one file; ``attempts``: how often storing it failed before."""
        t0 = time.perf_counter()
        if attempts:
            self.stats.add("store_retries")
        try:
            stored = self.destination.store(info.path, info.relpath)
        except CalstreamError as exc:
            attempts += 1
            self.stats.add("store_failures")
            interval = self.config.output.retry_unstored
            if final or not interval:
                self._unstored(info, attempts, str(exc))
            else:
                self._retries.failed(info.relpath, (info, str(exc)), attempts,
                                     transient=exc.retriable)
                log.error(
                    "%s: %s not stored (attempt %d), trying again in %.0f s "
                    "(output.retry_unstored); it stays in the spool until then: %s",
                    self.name, info.relpath, attempts, interval, exc,
                )
            return
        self._retries.stored()
        if attempts:
            log.warning("%s: %s stored at attempt %d", self.name, info.relpath, attempts + 1)
        self.stats.add("seconds_store", time.perf_counter() - t0)
        self.stats.observe("stage_seconds", time.perf_counter() - t0, stage="store")
        self.stats.add("files_stored")
        self.stats.add("bytes_out", stored.size)
        self.stats.add("bytes_uncompressed", info.raw_bytes)
        if self.outbox.has_file(stored.path):
            log.info("%s: %s was announced before; not announcing again", self.name, stored.path)
        else:
            event = build_storage_event(stored, info, self.event_settings)
            self.outbox.add(event)
            self.stats.add("events")
            if self.publisher is not None:
                self.publisher.wake()
        self.spool.remove(info.path, last_train=info.last_train)
        log.info(
            "%s: stored %s (%d trains, %.1f MB, adler32 %s)",
            self.name, stored.url, info.trains, stored.size / 1e6, stored.adler32,
        )

    def _unstored(self, info: FileInfo, attempts: int, error: str) -> None:
        self.stats.add("files_unstored")
        log.error(
            "%s: %s not stored after %d attempt(s), kept in the spool for the next start: %s",
            self.name, info.relpath, attempts, error,
        )

    def _remove_stale_parts(self) -> None:
        """Delete hidden partial uploads an earlier run of this spool left in its run folder.

        Only names this process writes (its run, aggregator and modules) are touched: other
        processes writing the same run use other aggregators (see *Several nodes*).
        """
        remove = getattr(self.destination, "remove_stale_parts", None)
        if remove is None:
            return
        out = self.config.output
        modules = set(self.config.source.modules)

        def owned(name: str) -> bool:
            parsed = parse_corr_filename(name)
            return parsed is not None and parsed[:2] == (out.run, out.aggregator) and (
                parsed[2] in modules)

        try:
            removed = remove(f"r{out.run:04d}", owned)
        except CalstreamError as exc:  # the door may be down: the uploads will say so
            log.warning("%s: cannot look for stale partial uploads: %s", self.name, exc)
            return
        if removed:
            log.warning("%s: removed %d partial upload(s) an earlier run left at %s: %s",
                        self.name, len(removed), self.destination.url, ", ".join(removed))

    def _stop_publisher(self, publisher: KafkaPublisher) -> None:
        """Give the relay ``flush_timeout`` s to publish what is pending, then stop it."""
        pending = publisher.flush(self.config.events.kafka.flush_timeout)
        publisher.stop()
        self.stats.add("events_published", publisher.stats().published)
        self.stats.add("events_pending", pending)
        if pending:
            log.warning(
                "%s: %d storage event(s) not yet on Kafka; they stay in %s and are published "
                "at the next start", self.name, pending, self.outbox.path,
            )

    # -- reporting ----------------------------------------------------------------------------

    def _backlog(self) -> tuple[int, int]:
        """Trains waiting for a worker or the writer, and how many may wait."""
        q = self._queues
        waiting = len(q["work"]) + q["results"].qsize()
        waiting += len(self._assembler) if self._assembler is not None else 0
        return waiting, self.config.pipeline.queue_size + self._slabs.count

    def _gauges(self) -> dict[str, Any]:
        """Sampled at each Prometheus scrape."""
        q = self._queues
        s = self.stats.snapshot()
        try:
            events_pending = self.outbox.counts().get("pending", 0)
        except CalstreamError:
            events_pending = float("nan")  # e.g. closed at the end of the run
        out = s.get("bytes_out", 0)
        return {
            "queue_depth": {"parts": len(q["parts"]), "work": len(q["work"]),
                            "results": q["results"].qsize(), "files": q["files"].qsize(),
                            "assembly": len(self._assembler) if self._assembler else 0},
            "queue_capacity": {"parts": q["parts"].maxsize, "work": q["work"].maxsize,
                               "results": self._slabs.count},
            "files_pending": q["files"].qsize(),
            "files_awaiting_retry": len(getattr(self, "_retries", ())),
            "events_pending": events_pending,
            "compression_ratio": s.get("bytes_uncompressed", 0) / out if out else 0.0,
        }

    def _summary(self, seconds: float) -> RunSummary:
        s = self.stats.snapshot()
        problem_keys = (
            "rejected_messages", "rejected_trains_backwards", "rejected_train_id_jump",
            "rejected_duplicates", "ignored_sources", "module_missing", "module_rejected",
            "module_failed", "module_write_failed", "files_unstored", "spool_full_stop",
            "dropped_trains", "dropped_parts",
        )
        return RunSummary(
            trains=int(s.get("trains_written", 0)),
            frames=int(s.get("frames_written", 0)),
            bytes_in=int(s.get("bytes_in", 0)),
            bytes_out=int(s.get("bytes_out", 0)),
            files=int(s.get("files_stored", 0)),
            events=int(s.get("events", 0)),
            events_published=(
                int(s.get("events_published", 0)) if self.publisher is not None else None
            ),
            events_pending=int(s.get("events_pending", 0)),
            seconds=seconds,
            unstored_files=int(s.get("files_unstored", 0)),
            bytes_uncompressed=int(s.get("bytes_uncompressed", 0)),
            stage_seconds={
                stage: float(s.get(f"seconds_{stage}", 0.0))
                for stage in ("correct", "compress", "write", "store")
            },
            problems={k: int(s[k]) for k in problem_keys if s.get(k)},
        )


def _small_array(
    values: dict[str, Any], key: str, cells: int, source: str, train_id: int
) -> np.ndarray | None:
    """A per-cell integer array of the stream, checked; None when the stream lacks it."""
    value = values.get(key)
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu" or value.shape != (
        cells,
    ):
        found = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else repr(value)
        raise DataError(
            f"expected {cells} integers, got {found[:80]}",
            source=source, train_id=train_id, key=key,
        )
    return value


def _fits(shape: tuple[int, ...], axes: str, module_shape: tuple[int, int]) -> bool:
    """Whether an array shape matches a registry axis order like ``"frames,2,ss,fs"``."""
    names = axes.split(",")
    sizes = {"ss": module_shape[0], "fs": module_shape[1]}
    return len(shape) == len(names) and all(
        name == "frames" or (sizes[name] if name in sizes else int(name)) == n
        for name, n in zip(names, shape, strict=True)
    )


def _frame_values(
    values: dict[str, Any], key: str, frames: int, source: str, train_id: int
) -> np.ndarray | None:
    """A per-frame integer array ((frames,) or (frames, 1), as raw files carry them), checked
    and flattened; None when the stream lacks it."""
    value = values.get(key)
    if value is None:
        return None
    if (isinstance(value, np.ndarray) and value.dtype.kind in "iu"
            and value.shape in ((frames,), (frames, 1))):
        flat = value.reshape(frames)
        if frames == 0 or (int(flat.min()) >= 0):
            return flat
    found = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else repr(value)
    raise DataError(
        f"expected {frames} non-negative integers, got {found[:80]}",
        source=source, train_id=train_id, key=key,
    )


def _train_id(metadata: dict[str, Any]) -> int | None:
    for meta in metadata.values():
        tid = meta.get("timestamp.tid") if isinstance(meta, dict) else None
        if isinstance(tid, int) and not isinstance(tid, bool):
            return tid
    return None


def _timestamp_ns(metadata: dict[str, Any]) -> int:
    """The train's timestamp in ns, or 0 when the stream does not carry one."""
    for meta in metadata.values():
        sec, frac = meta.get("timestamp.sec"), meta.get("timestamp.frac")
        if isinstance(sec, str) and isinstance(frac, str) and sec.isdigit() and frac.isdigit():
            return int(sec) * 1_000_000_000 + int(frac.ljust(18, "0")[:9])
        ts = meta.get("timestamp")
        if isinstance(ts, int | float) and ts > 0:
            return int(ts * 1e9)
    return 0
