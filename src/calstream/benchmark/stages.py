"""Each stage alone on the bench's data, and the straightforward baseline.

Every figure is GB/s of *raw input* (uint16 ADC bytes of one module-train), so stages that
handle the corrected output (compress, write) are comparable with those that handle the raw
data (receive, correct) and with the end-to-end rate:

* ``memory copy``: ``np.copyto`` of the raw train (what the machine can move, for scale);
* ``receive + decode``: ZeroMQ PUSH in a thread → :class:`~calstream.ingest.Receiver` (PULL,
  zero-copy Karabo Bridge 2.2 decode) over TCP loopback, 1 receiver as in the pipeline;
* ``correct``: :class:`~calstream.calibrate.JungfrauCorrector` with the configured backend,
  1 thread and ``workers`` threads (one train each, concurrently);
* ``compress``: the configured codecs on the corrected data, gain and mask, frame by frame,
  1 thread and ``workers`` threads;
* ``write``: :class:`~calstream.store.SequenceWriter` appending ready chunks into a spool
  (``write_direct_chunk``), files closed, 1 thread as in the pipeline.

The **bound** is the slowest of receive, correct (``workers`` threads), compress (``workers``
threads) and write (1 thread): no pipeline of these stages can beat it. The **baseline** is the
job as it is usually written, single-threaded: the NumPy reference correction
(:func:`~calstream.calibrate.reference.correct_jungfrau_reference`) and h5py dataset writes
through HDF5's own filter pipeline (``hdf5plugin.Bitshuffle()``, LZ4), trains from memory.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calstream.errors import CalstreamError

__all__ = ["BenchData", "StageRate", "measure_baseline", "measure_stages"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRate:
    """One stage measured alone."""

    name: str
    threads: int
    gbps: float  # raw input equivalent
    seconds_per_train: float  # wall time per module-train (all threads together)
    note: str = ""


@dataclass
class BenchData:
    """One module's simulated train and what the pipeline would make of it."""

    adc: np.ndarray
    memory_cells: np.ndarray
    corrector: Any
    codecs: dict[str, Any]
    source: str

    @property
    def nbytes(self) -> int:
        return self.adc.nbytes


def _best(fn: Callable[[], Any], rounds: int) -> float:
    """Fastest wall time of ``rounds`` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _parallel(fn: Callable[[int], Any], threads: int, rounds: int) -> float:
    """Wall time of ``threads`` concurrent calls ``fn(i)`` (best of ``rounds``)."""
    if threads == 1:
        return _best(lambda: fn(0), rounds)
    with ThreadPoolExecutor(threads) as pool:
        return _best(lambda: list(pool.map(fn, range(threads))), rounds)


def _rate(name: str, data: BenchData, seconds: float, threads: int, trains: int = 1,
          note: str = "") -> StageRate:
    trains_total = trains * threads
    return StageRate(name, threads, data.nbytes * trains_total / seconds / 1e9,
                     seconds / trains_total, note)


def _encode_train(data: BenchData, outputs: tuple[np.ndarray, ...], slab: np.ndarray
                  ) -> dict[str, list[np.ndarray]]:
    used = 0
    chunks: dict[str, list[np.ndarray]] = {}
    for key, buf in zip(("adc", "gain", "mask"), outputs, strict=True):
        codec = data.codecs[key]
        encoded = chunks[key] = []
        for frame in buf:
            chunk = codec.encode_into(frame, slab[used:])
            encoded.append(chunk)
            used += chunk.nbytes
    return chunks


def _slab_bytes(data: BenchData) -> int:
    frame = data.adc.shape[1] * data.adc.shape[2]
    return data.adc.shape[0] * sum(
        data.codecs[k].max_encoded_size(frame * size, size)
        for k, size in (("adc", 4), ("gain", 1), ("mask", 4)))


def measure_receive(data: BenchData, trains: int) -> StageRate:
    """ZeroMQ PUSH (a thread) → Receiver, pre-encoded trains, TCP loopback."""
    import zmq

    from calstream.ingest import Receiver, encode

    frames = encode({data.source: {"data.adc": data.adc, "data.memoryCell": data.memory_cells}},
                    {data.source: {"source": data.source, "timestamp.tid": 1}})
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    receiver = Receiver(f"tcp://127.0.0.1:{port}", "pull", context=context,
                        max_array_bytes=data.nbytes * 2)

    def send() -> None:
        for _ in range(trains + 1):
            push.send_multipart(frames, copy=False)

    sender = threading.Thread(target=send, daemon=True)
    try:
        sender.start()
        if receiver.receive(timeout=30) is None:  # the first one connects and warms up
            raise CalstreamError("receive benchmark: nothing arrived", source=receiver.endpoint)
        t0 = time.perf_counter()
        for _ in range(trains):
            if receiver.receive(timeout=30) is None:
                raise CalstreamError("receive benchmark: a train did not arrive",
                                     source=receiver.endpoint)
        seconds = time.perf_counter() - t0
        sender.join()
    finally:
        receiver.close()
        push.close(linger=0)
        context.term()
    return _rate("receive + decode", data, seconds, 1, trains,
                 "ZeroMQ PUSH→PULL over TCP loopback, Karabo Bridge 2.2, zero-copy")


def measure_stages(data: BenchData, *, workers: int, spool: Path, rounds: int,
                   write_trains: int, trains_per_file: int) -> dict[str, StageRate]:
    """Memory copy, receive + decode, correct, compress and write, each alone."""
    out: dict[str, StageRate] = {}
    copy = np.empty_like(data.adc)
    out["memory copy"] = _rate("memory copy", data,
                               _best(lambda: np.copyto(copy, data.adc), rounds * 4), 1,
                               note="np.copyto of the raw train")
    out["receive + decode"] = measure_receive(data, max(4, rounds * 2))

    outs = [data.corrector.empty_outputs(data.adc.shape[0]) for _ in range(workers)]
    inputs = [data.adc.copy() for _ in range(workers)]

    def correct(i: int) -> None:
        data.corrector.correct(inputs[i], None, data.memory_cells, *outs[i])

    backend = data.corrector.backend
    for threads in sorted({1, workers}):
        out[f"correct x{threads}"] = _rate("correct", data, _parallel(correct, threads, rounds),
                                           threads, note=f"{backend} backend")
    slabs = [np.empty(_slab_bytes(data), np.uint8) for _ in range(workers)]
    specs = ", ".join(f"{key} {codec.spec}" for key, codec in data.codecs.items())

    def compress(i: int) -> None:
        _encode_train(data, outs[i], slabs[i])

    for threads in sorted({1, workers}):
        out[f"compress x{threads}"] = _rate(
            "compress", data, _parallel(compress, threads, rounds), threads,
            note=f"corrected outputs: {specs}")
    chunks = _encode_train(data, outs[0], slabs[0])
    out["write"] = _measure_write(data, chunks, spool, write_trains, trains_per_file)
    return out


def _measure_write(data: BenchData, chunks: dict[str, list[np.ndarray]], root: Path,
                   trains: int, trains_per_file: int) -> StageRate:
    from calstream.store import SequenceWriter, Spool

    cells = data.adc.shape[0]
    small = {"memoryCell": data.memory_cells.astype(np.uint8),
             "frameNumber": np.zeros(cells, np.uint64)}
    source = data.source.replace("/DET/", "/CORR/").replace(":daqOutput", ":output")

    def one_file() -> float:
        shutil.rmtree(root, ignore_errors=True)
        writer = SequenceWriter(
            Spool(root), run=1, proposal=900000, detector="jungfrau", module=1,
            aggregator="JNGFR", source=source, cells=cells, codecs=data.codecs,
            trains_per_file=trains_per_file, provenance={},
        )
        t0 = time.perf_counter()
        for i in range(trains):
            writer.write_train(10000 + i, 0, chunks, small)
        writer.close()
        return time.perf_counter() - t0

    try:
        # The first file takes pages the filesystem never had (on a VM each costs a host
        # first touch); the pipeline, whose stored files are deleted, reuses freed ones.
        first = one_file()
        seconds = min(one_file() for _ in range(2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return _rate("write", data, seconds, 1, trains,
                 f"SequenceWriter, ready chunks, file closed, into {root.parent} (first file: "
                 f"{data.nbytes * trains / first / 1e9:.2f} GB/s)")


def measure_baseline(data: BenchData, *, trains: int, path: Path) -> StageRate:
    """NumPy reference correction + h5py writes through the Bitshuffle filter, 1 thread."""
    import h5py
    import hdf5plugin

    from calstream.calibrate.reference import correct_jungfrau_reference

    consts = data.corrector.constants
    cells = data.adc.shape[0]
    cell_index = data.corrector.cell_indices(data.memory_cells, cells)
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        filt = hdf5plugin.Bitshuffle(cname="lz4")
        shape = (trains, *data.adc.shape)
        chunks = (1, 1, *data.adc.shape[1:])
        dsets = [f.create_dataset(name, shape=shape, dtype=dt, chunks=chunks, **filt)
                 for name, dt in (("adc", np.float32), ("gain", np.uint8), ("mask", np.uint32))]
        for i in range(trains):
            energy, gain, mask = correct_jungfrau_reference(data.adc, None, cell_index, consts)
            for ds, arr in zip(dsets, (energy, gain, mask), strict=True):
                ds[i] = arr
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    path.unlink(missing_ok=True)
    log.info("baseline: %d trains in %.2f s, file %.1f MB", trains, seconds, size / 1e6)
    return _rate("baseline", data, seconds, 1, trains,
                 "NumPy reference + h5py with hdf5plugin.Bitshuffle (LZ4), 1 thread")
