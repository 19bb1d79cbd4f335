"""Write: ready chunks into EuXFEL files, against h5py's own filter pipeline.

Run: ``pytest bench/test_bench_writer.py --benchmark-only``. One simulated 16-cell JUNGFRAU
train, corrected (float32 data, uint8 gain, uint32 mask) and compressed with bitshuffle+LZ4
frame by frame, is appended ``TRAINS`` times per round:

* ``SequenceWriter``: what the pipeline's writer thread does (``write_direct_chunk`` of the
  ready chunks, INDEX, file created and closed in the round);
* ``h5py + hdf5plugin filter``: the same corrected arrays written with ``ds[i] = array``
  through HDF5's Bitshuffle filter (compression inside HDF5, one thread): the baseline's way.

Rates are GB/s of the *raw* input the train came from (comparable with the kernels), the
label gives the compressed MB per train. Files go to ``/dev/shm`` when it exists: new pages
on this VM's disk cost a host first-touch that would hide the writer's own cost.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from calstream.calibrate import JungfrauCorrector, load_jungfrau_constants, synth_jungfrau_constants
from calstream.ingest.simulate import JungfrauSimulation
from calstream.store import SequenceWriter, Spool, parse_codec

CELLS = 16
TRAINS = 10


@pytest.fixture(scope="module")
def workdir():
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    path = Path(tempfile.mkdtemp(prefix="calstream-bench-writer-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def corrected(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("constants") / "jungfrau-16cell.h5"
    consts = load_jungfrau_constants(synth_jungfrau_constants(path, cells=CELLS, seed=0))
    sim = JungfrauSimulation(modules=(1,), cells=CELLS, n_distinct=1,
                             offsets={1: consts.offset}, gains={1: consts.rel_gain})
    data, _ = sim.train(10000)
    adc = data[sim.sources[0]]["data.adc"]
    corrector = JungfrauCorrector(consts)
    outs = corrector.empty_outputs(CELLS)
    corrector.correct(adc, None, np.arange(CELLS), *outs)
    codec = parse_codec("bitshuffle-lz4")
    chunks = {key: [bytes(codec.encode(frame)) for frame in buf]
              for key, buf in zip(("adc", "gain", "mask"), outs, strict=True)}
    return adc.nbytes, dict(zip(("adc", "gain", "mask"), outs, strict=True)), chunks


@pytest.mark.benchmark(group="write")
def test_sequence_writer(benchmark, rates, corrected, workdir) -> None:
    nbytes, _, chunks = corrected
    codecs = {key: parse_codec("bitshuffle-lz4") for key in chunks}
    small = {"memoryCell": np.arange(CELLS, dtype=np.uint8),
             "frameNumber": np.zeros(CELLS, np.uint64)}
    counter = itertools.count()

    def write_file() -> None:
        root = workdir / f"spool-{next(counter)}"
        writer = SequenceWriter(
            Spool(root), run=1, proposal=900000, detector="jungfrau", module=1,
            aggregator="JNGFR", source="SPB_IRDA_JF4M/CORR/JNGFR01:output", cells=CELLS,
            codecs=codecs, trains_per_file=TRAINS, provenance={},
        )
        closed = []
        for i in range(TRAINS):
            closed += writer.write_train(10000 + i, 0, chunks, small)
        assert len(closed) == 1
        shutil.rmtree(root)

    benchmark.pedantic(write_file, rounds=5, warmup_rounds=1)
    size = sum(len(c) for bufs in chunks.values() for c in bufs) / 1e6
    rates.add(f"SequenceWriter, ready chunks ({size:.0f} MB/train), {TRAINS} trains",
              nbytes * TRAINS, benchmark)


@pytest.mark.benchmark(group="write")
def test_h5py_filter_pipeline(benchmark, rates, corrected, workdir) -> None:
    import h5py
    import hdf5plugin

    nbytes, arrays, _ = corrected
    counter = itertools.count()

    def write_file() -> None:
        path = workdir / f"baseline-{next(counter)}.h5"
        with h5py.File(path, "w") as f:
            for name, arr in arrays.items():
                ds = f.create_dataset(name, shape=(TRAINS, *arr.shape), dtype=arr.dtype,
                                      chunks=(1, 1, *arr.shape[1:]),
                                      **hdf5plugin.Bitshuffle(cname="lz4"))
                for i in range(TRAINS):
                    ds[i] = arr
        path.unlink()

    benchmark.pedantic(write_file, rounds=3, warmup_rounds=1)
    rates.add(f"h5py + hdf5plugin Bitshuffle filter, 1 thread, {TRAINS} trains",
              nbytes * TRAINS, benchmark)
