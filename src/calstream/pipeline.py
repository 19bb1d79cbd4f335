"""Wires the stages together: ingest → calibrate → store → events.

Threads and the bounded queues between them::

    receiver ──work──► workers (N) ──results──► writer ──files──► storer
    decode, check      correct + compress        reorder by train,   destination,
    module data        chunks (GIL released)     append chunks,      outbox, spool
                                                 roll over files     clean-up

Every accepted train gets a sequence number; the writer puts results back in that order, so
the files' train ids always increase whatever order the workers finish in. A module whose data
is missing or malformed in a train is written as a gap (INDEX count 0), counted and logged.
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

from .calibrate import JungfrauCorrector, load_jungfrau_constants, synth_jungfrau_constants
from .config import Config
from .errors import CalstreamError, ConstantsError, DataError, ProtocolError
from .events import EventSettings, KafkaPublisher, Outbox, build_storage_event
from .ingest import JungfrauSimulation, Receiver, Sender, run_sender
from .metrics import RunSummary, Stats
from .store import (
    FileInfo,
    SequenceWriter,
    Spool,
    open_destination,
    parse_codec,
    read_file_info,
)
from .store.bitround import bitround
from .store.spool import SpoolLimit

__all__ = ["Pipeline"]

log = logging.getLogger(__name__)

FRAME_SHAPE = (512, 1024)
OUTPUT_DTYPES = {"adc": np.float32, "gain": np.uint8, "mask": np.uint32}
_STOP = object()
_SENDER_PATTERN = {"pull": "push", "sub": "pub", "req": "rep"}


@dataclass
class ModuleInput:
    """One module's raw data in one train (views on the received ZeroMQ frames)."""

    adc: np.ndarray
    gain: np.ndarray | None
    memory_cell: np.ndarray
    frame_number: np.ndarray


@dataclass
class TrainWork:
    seq: int
    train_id: int
    timestamp_ns: int
    modules: dict[int, ModuleInput]
    nbytes: int


@dataclass
class TrainResult:
    seq: int
    train_id: int
    timestamp_ns: int
    slab: np.ndarray
    chunks: dict[int, dict[str, list[np.ndarray]]] = field(default_factory=dict)
    small: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    frames: int = 0


class SlabPool:
    """A fixed set of byte buffers that hold one train's encoded chunks, reused forever.

    Encoding into fresh ``bytes`` costs a page fault per 4 KiB of output on first touch; a
    slab is touched once and then recycled by the writer. A worker takes one slab per train
    before it starts, so the train the writer waits for always has its slab (no deadlock);
    when all slabs are in flight, workers wait, which bounds memory.
    """

    def __init__(self, count: int, nbytes: int) -> None:
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
        self.name = config.pipeline.name

        # Constants first: a missing or mis-shaped constant is the likeliest start-up error,
        # and it must stop us before the spool, the outbox or any socket exists.
        self.constants = self._load_constants()
        out = config.output
        self.codecs = {key: parse_codec(spec) for key, spec in out.compression.items()}
        for key in ("adc", "gain", "mask"):
            self.codecs.setdefault(key, parse_codec("bitshuffle-lz4"))
        self.destination = open_destination(out.destination, out.webdav_settings())
        self.spool = Spool(Path(out.spool), retention=out.retention)
        self.spool_limit = SpoolLimit(self.spool, out.spool_limit_bytes, out.overflow)
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
        self.correctors = {
            module: JungfrauCorrector(consts, backend=config.calibration.backend)
            for module, consts in self.constants.items()
        }

    # -- set-up -------------------------------------------------------------------------------

    def _load_constants(self) -> dict[int, Any]:
        cal = self.config.calibration
        loaded: dict[int, Any] = {}
        by_path: dict[Path, Any] = {}
        for module in self.config.source.modules:
            path = cal.constants_path(module)
            if not path.exists() and cal.synthesize_missing:
                log.warning(
                    "constants file %s not found: writing synthetic JUNGFRAU constants "
                    "(calibration.synthesize_missing = true; never use these for real data)",
                    path,
                )
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    synth_jungfrau_constants(path, cells=cal.cells, seed=module)
                except OSError as exc:
                    raise ConstantsError(
                        f"cannot write synthetic constants: {exc.strerror or exc}",
                        source=str(path), key="calibration.constants",
                    ) from None
            if path not in by_path:
                try:
                    by_path[path] = load_jungfrau_constants(path, cells=cal.cells)
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

        work_q: queue.Queue[Any] = queue.Queue(maxsize=cfg.pipeline.queue_size)
        # Bounded by the slab pool: a worker needs a free slab before it takes on a train.
        result_q: queue.Queue[Any] = queue.Queue()
        self._slabs = SlabPool(2 * cfg.pipeline.workers + 2, self._slab_bytes())
        file_q: queue.Queue[Any] = queue.Queue()

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

        receiver = Receiver(cfg.source.endpoint, cfg.source.pattern, bind=cfg.source.bind)
        sender_thread = self._start_simulation(floor) if cfg.simulate.enabled else None

        started = time.monotonic()
        self._last_status = (started, 0)
        if self.publisher is not None:
            self.publisher.start()  # returns at once; events wait in the outbox for the broker
        # Several storers: uploads to a WebDAV door overlap (each waits on the network).
        for i in range(cfg.output.uploads):
            self._spawn(f"storer-{i}", self._store_loop, file_q)
        self._spawn("writer", self._write_loop, result_q, file_q, cfg.pipeline.workers)
        for i in range(cfg.pipeline.workers):
            self._spawn(f"worker-{i}", self._work_loop, work_q, result_q)
        try:
            self._receive_loop(receiver, work_q, sender_thread)
        finally:
            receiver.close()
            try:
                for _ in range(cfg.pipeline.workers):
                    self._put(work_q, _STOP)
            except RuntimeError:
                pass  # a thread failed: the others see self._failed and stop
            for thread in self._threads:
                while thread.is_alive():
                    thread.join(0.5)
            if sender_thread is not None:
                self._stop.set()
                sender_thread.join(timeout=5)
            if self.publisher is not None:
                self._stop_publisher(self.publisher)
            self.outbox.close()
            close = getattr(self.destination, "close", None)
            if close is not None:
                close()
        seconds = time.monotonic() - started
        if self._errors:
            raise self._errors[0]
        return self._summary(seconds)

    def _put(self, q: queue.Queue[Any], item: Any) -> None:
        """Put into a bounded queue, but give up if a pipeline thread has failed."""
        while True:
            try:
                q.put(item, timeout=0.5)
                return
            except queue.Full:
                if self._failed.is_set():
                    raise RuntimeError("a pipeline thread failed; see the log") from None

    def _get(self, q: queue.Queue[Any] | SlabPool) -> Any:
        """Take from a queue; ``_STOP`` once a pipeline thread has failed."""
        while True:
            try:
                return q.get(timeout=0.5)
            except queue.Empty:
                if self._failed.is_set():
                    return _STOP

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
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

    def _start_simulation(self, floor: int) -> threading.Thread:
        cfg = self.config
        sim_cfg = cfg.simulate
        simulation = JungfrauSimulation(
            modules=cfg.source.modules,
            cells=cfg.calibration.cells,
            gain_mode=sim_cfg.gain_mode,
            detector_id=cfg.source.detector_id,
            seed=sim_cfg.seed,
            offsets={m: c.offset for m, c in self.constants.items()},
            gains={m: c.rel_gain for m, c in self.constants.items()},
        )
        sender = Sender(
            cfg.source.endpoint, _SENDER_PATTERN[cfg.source.pattern], bind=not cfg.source.bind
        )

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

    def _receive_loop(
        self,
        receiver: Receiver,
        work_q: queue.Queue[Any],
        sender_thread: threading.Thread | None = None,
    ) -> None:
        cfg = self.config
        idle = cfg.source.idle_timeout
        seq = 0
        last_train: int | None = self._train_floor or None
        last_data = time.monotonic()
        next_status = time.monotonic() + cfg.pipeline.log_every
        log.info(
            "%s: receiving %s (%s) for modules %s",
            self.name, cfg.source.endpoint, cfg.source.pattern, list(cfg.source.modules),
        )
        while not self._stop.is_set():
            if self._max_trains is not None and seq >= self._max_trains:
                break
            now = time.monotonic()
            if now >= next_status:
                self._log_status(work_q)
                next_status = now + cfg.pipeline.log_every
            try:
                message = receiver.receive(timeout=0.2)
            except ProtocolError as exc:
                self.stats.add("rejected_messages")
                log.error("%s: rejected message: %s", self.name, exc)
                continue
            if message is None:
                quiet = time.monotonic() - last_data
                if idle and seq and quiet > idle:
                    log.info("%s: no data for %.1f s, stopping", self.name, idle)
                    break
                if sender_thread is not None and not sender_thread.is_alive() and quiet > 2.0:
                    log.info("%s: the simulation has finished; stopping", self.name)
                    break
                continue
            last_data = time.monotonic()
            data, metadata = message
            work = self._accept(seq, data, metadata, last_train)
            if work is None:
                continue
            last_train = work.train_id
            seq += 1
            self.stats.add("trains_in")
            self.stats.add("bytes_in", work.nbytes)
            self._put(work_q, work)

    def _accept(
        self, seq: int, data: dict[str, Any], metadata: dict[str, Any], last_train: int | None
    ) -> TrainWork | None:
        cfg = self.config
        train_id = _train_id(metadata)
        if not train_id:
            self.stats.add("rejected_messages")
            log.error("%s: rejected message without a valid timestamp.tid (%r; sources %s)",
                      self.name, train_id, sorted(data))
            return None
        if last_train is not None and train_id <= last_train:
            self.stats.add("rejected_trains_backwards")
            log.error(
                "%s: train %d rejected: train ids must increase (last written %d%s)",
                self.name, train_id, last_train,
                f" in run {cfg.output.run}" if last_train == self._train_floor else "",
            )
            return None
        modules: dict[int, ModuleInput] = {}
        nbytes = 0
        for module in cfg.source.modules:
            source = cfg.source.source_name(module)
            if source not in data:
                self.stats.add("module_missing")
                log.warning("%s: train %d has no data from %s", self.name, train_id, source)
                continue
            try:
                item = self._module_input(source, train_id, data[source])
            except DataError as exc:
                self.stats.add("module_rejected")
                log.error("%s: %s", self.name, exc)
                continue
            modules[module] = item
            nbytes += item.adc.nbytes + (item.gain.nbytes if item.gain is not None else 0)
        timestamp_ns = _timestamp_ns(metadata)
        return TrainWork(seq, train_id, timestamp_ns, modules, nbytes)

    def _module_input(self, source: str, train_id: int, values: dict[str, Any]) -> ModuleInput:
        cells = self.config.calibration.cells
        gain_mode = self.config.source.gain_mode
        adc = values.get("data.adc")
        if not isinstance(adc, np.ndarray):
            raise DataError("missing array 'data.adc'", source=source, train_id=train_id,
                            key="data.adc")
        if adc.dtype != np.uint16 or adc.shape != (cells, *FRAME_SHAPE):
            raise DataError(
                f"expected uint16 {(cells, *FRAME_SHAPE)}, got {adc.dtype} {adc.shape}",
                source=source, train_id=train_id, key="data.adc",
            )
        gain = values.get("data.gain") if gain_mode in ("auto", "array") else None
        if gain_mode == "array" and gain is None:
            raise DataError("missing array 'data.gain' (source.gain_mode = 'array')",
                            source=source, train_id=train_id, key="data.gain")
        if gain is not None and (
            not isinstance(gain, np.ndarray) or gain.dtype != np.uint8 or gain.shape != adc.shape
        ):
            raise DataError(
                f"expected uint8 {adc.shape}, got {getattr(gain, 'dtype', type(gain).__name__)} "
                f"{getattr(gain, 'shape', '')}",
                source=source, train_id=train_id, key="data.gain",
            )
        memory_cell = _small_array(values, "data.memoryCell", cells, source, train_id)
        if memory_cell is None:
            memory_cell = np.arange(cells)
        if memory_cell.min() < 0 or memory_cell.max() > 255:
            raise DataError(f"memory cells out of range: {memory_cell.tolist()}",
                            source=source, train_id=train_id, key="data.memoryCell")
        frame_number = _small_array(values, "data.frameNumber", cells, source, train_id)
        if frame_number is None:
            frame_number = np.zeros(cells)
        return ModuleInput(
            adc, gain, memory_cell.astype(np.uint8), frame_number.astype(np.uint64)
        )

    def _slab_bytes(self) -> int:
        """Bytes needed for the encoded chunks of one train of all modules, at worst."""
        per_frame = sum(
            self.codecs[key].max_encoded_size(
                int(np.prod(FRAME_SHAPE)) * np.dtype(dt).itemsize, np.dtype(dt).itemsize
            )
            for key, dt in OUTPUT_DTYPES.items()
        )
        return per_frame * self.config.calibration.cells * len(self.config.source.modules)

    def _work_loop(self, work_q: queue.Queue[Any], result_q: queue.Queue[Any]) -> None:
        cells = self.config.calibration.cells
        # Per-worker output buffers (aligned, so the kernels can stream their stores), reused
        # for every train: chunks are encoded before the next train overwrites them.
        data, gain, mask = next(iter(self.correctors.values())).empty_outputs(cells)
        buffers = {"adc": data, "gain": gain, "mask": mask}
        try:
            while True:
                # The slab first: the worker that holds the oldest train must never wait for
                # one, or the writer (waiting for that train) would never free any.
                slab = self._get(self._slabs)
                if slab is _STOP:
                    return
                work = self._get(work_q)
                if work is _STOP:
                    self._slabs.put(slab)
                    return
                result_q.put(self._process(work, slab, buffers))
        finally:
            result_q.put(_STOP)  # always, or the writer would wait for this worker forever

    def _process(
        self, work: TrainWork, slab: np.ndarray, buffers: dict[str, np.ndarray]
    ) -> TrainResult:
        """Correct and compress one train's modules into ``slab``."""
        cells = self.config.calibration.cells
        result = TrainResult(work.seq, work.train_id, work.timestamp_ns, slab)
        used = 0
        for module, item in work.modules.items():
            source = self.config.source.source_name(module)
            t0 = time.perf_counter()
            try:
                self.correctors[module].correct(
                    item.adc, item.gain, item.memory_cell,
                    buffers["adc"], buffers["gain"], buffers["mask"],
                    source=source, train_id=work.train_id,
                )
                if self.config.output.bitround and buffers["adc"].dtype == np.float32:
                    bitround(buffers["adc"], self.config.output.bitround)
                t1 = time.perf_counter()
                chunks: dict[str, list[np.ndarray]] = {}
                for key, buf in buffers.items():
                    codec = self.codecs[key]
                    encoded = chunks[key] = []
                    for frame in buf:
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
            result.chunks[module] = chunks
            result.small[module] = {
                "memoryCell": item.memory_cell,
                "frameNumber": item.frame_number,
            }
            result.frames += cells
            self.stats.add("seconds_correct", t1 - t0)
            self.stats.add("seconds_compress", t2 - t1)
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
                detector="jungfrau",
                module=module,
                aggregator="JNGFR",
                source=cfg.output_source(module),
                cells=cfg.calibration.cells,
                codecs=self.codecs,
                trains_per_file=cfg.output.trains_per_file,
                max_file_bytes=cfg.output.max_file_bytes,
                provenance={
                    "constants": self.constants[module].provenance,
                    "backend": cfg.calibration.backend,
                    # lossy: readers must know data.adc keeps only these mantissa bits
                    **({"bitround": cfg.output.bitround} if cfg.output.bitround else {}),
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
                    self.stats.add("seconds_write", time.perf_counter() - t0)
                    self.stats.add("trains_written")
                    self.stats.add("frames_written", result.frames)
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
        for info in closed:
            file_q.put(info)

    def _store_loop(self, file_q: queue.Queue[Any]) -> None:
        # Not _get(): even after a failure, the files the writer closed are still stored.
        while True:
            info = file_q.get()
            if info is _STOP:
                file_q.put(_STOP)  # for the other storers
                return
            self._store_one(info)

    def _store_one(self, info: FileInfo) -> None:
        t0 = time.perf_counter()
        try:
            stored = self.destination.store(info.path, info.relpath)
        except CalstreamError as exc:
            self.stats.add("files_unstored")
            log.error(
                "%s: %s not stored, kept in the spool for the next start: %s",
                self.name, info.relpath, exc,
            )
            return
        self.stats.add("seconds_store", time.perf_counter() - t0)
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

    def _log_status(self, work_q: queue.Queue[Any]) -> None:
        s = self.stats.snapshot()
        now = time.monotonic()
        last_time, last_bytes = self._last_status
        self._last_status = (now, s.get("bytes_in", 0))
        backlog = f", {self.publisher.pending()} events wait for Kafka" if (
            self.publisher is not None and self.publisher.pending()) else ""
        log.info(
            "%s: %d trains in (%.2f GB/s), %d written, %d files stored, queue %d/%d%s",
            self.name,
            s.get("trains_in", 0),
            (s.get("bytes_in", 0) - last_bytes) / max(now - last_time, 1e-9) / 1e9,
            s.get("trains_written", 0),
            s.get("files_stored", 0),
            work_q.qsize(),
            self.config.pipeline.queue_size,
            backlog,
        )

    def _summary(self, seconds: float) -> RunSummary:
        s = self.stats.snapshot()
        problem_keys = (
            "rejected_messages", "rejected_trains_backwards", "module_missing",
            "module_rejected", "module_failed", "module_write_failed", "files_unstored",
            "spool_full_stop",
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
