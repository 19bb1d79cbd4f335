"""JUNGFRAU kernel throughput against a memory copy of the same bytes.

Run: ``pytest bench/test_bench_kernels.py`` (add ``-k numba`` etc. to narrow). One simulated
16-frame train of one module (16 MB raw, realistic content from
:class:`~calstream.ingest.simulate.JungfrauSimulation`: dark noise, sparse photons, a few
spots in G1/G2), corrected with 16-cell constants (every frame its own cell: 300 MB of tables
per train, the hard case) and with 1-cell constants (tables fit in cache). Outputs are
preallocated and 64-byte aligned (:meth:`JungfrauCorrector.empty_outputs`). The summary at the
end gives GB/s of raw input, the ratio to ``np.copyto`` of the same 16 MB and the two-thread
scaling (two Python threads on the two halves of the train; the kernels release the GIL).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from calstream.calibrate import (
    JungfrauConstants,
    JungfrauCorrector,
    load_jungfrau_constants,
    synth_jungfrau_constants,
)
from calstream.calibrate.native import native_available
from calstream.ingest.simulate import JungfrauSimulation

CELLS = 16
ROUNDS = 20
JF_REFERENCE = "jungfrau numpy reference, 16-cell constants, 1 thread"
pytestmark = pytest.mark.benchmark(group="jungfrau")


@pytest.fixture(scope="module")
def constants(tmp_path_factory: pytest.TempPathFactory) -> dict[int, JungfrauConstants]:
    path = tmp_path_factory.mktemp("constants") / "jungfrau-16cell.h5"
    c16 = load_jungfrau_constants(synth_jungfrau_constants(path, cells=CELLS, seed=0))
    c1 = JungfrauConstants.from_kernel(c16.offset[:1], c16.rel_gain[:1], c16.badpix[:1])
    return {16: c16, 1: c1}


@pytest.fixture(scope="module")
def train(constants: dict[int, JungfrauConstants]) -> dict[str, np.ndarray]:
    sim = JungfrauSimulation(
        modules=(1,), cells=CELLS, n_distinct=1, offsets={1: constants[16].offset}
    )
    data, _ = sim.train(10000)
    return data[sim.sources[0]]


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


@pytest.mark.benchmark(group="memory")
def test_memory_copy_same_bytes(benchmark, rates, train) -> None:
    adc = train["data.adc"]
    dst = np.empty_like(adc)
    benchmark.pedantic(np.copyto, (dst, adc), rounds=ROUNDS * 5, warmup_rounds=2)
    rates.add("memory copy, same bytes", adc.nbytes, benchmark)
    np.testing.assert_array_equal(dst, adc)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.benchmark(group="memory")
def test_memory_copy_beyond_cache(benchmark, rates, train, pool, threads) -> None:
    """256 MB: the copy once the bytes no longer fit in the last-level cache. With two threads
    (np.copyto releases the GIL) it shows how far memory bandwidth itself scales right now,
    which bounds the two-thread scaling of the kernels with 16-cell constants."""
    src = np.tile(train["data.adc"], (16, 1, 1))
    dst = np.empty_like(src)
    half = src.shape[0] // 2

    def two() -> None:
        parts = (slice(0, half), slice(half, None))
        for future in [pool.submit(np.copyto, dst[sl], src[sl]) for sl in parts]:
            future.result()

    if threads == 1:
        benchmark.pedantic(np.copyto, (dst, src), rounds=5, warmup_rounds=1)
    else:
        benchmark.pedantic(two, rounds=5, warmup_rounds=1)
    label = "memory copy, 256 MB (beyond cache), " + ("1 thread" if threads == 1 else "2 threads")
    rates.add(label, src.nbytes, benchmark)


BACKENDS = [
    pytest.param(
        b,
        marks=pytest.mark.skipif(
            b == "cython" and not native_available(), reason="calstream._native not built"
        ),
    )
    for b in ("numba", "cython")
]


@pytest.mark.parametrize("cells", [16, 1])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.benchmark(group="calibrate")
def test_jungfrau(benchmark, rates, constants, train, pool, backend, cells, threads) -> None:
    corrector = JungfrauCorrector(constants[cells], backend)
    corrector.warmup()
    adc, cell = train["data.adc"], train["data.memoryCell"]
    outs = corrector.empty_outputs(adc.shape[0])
    half = adc.shape[0] // 2

    def one() -> None:
        corrector.correct(adc, None, cell, *outs)

    def part(sl: slice) -> None:
        corrector.correct(adc[sl], None, cell[sl], *(o[sl] for o in outs))

    def two() -> None:
        for future in [pool.submit(part, slice(0, half)), pool.submit(part, slice(half, None))]:
            future.result()

    benchmark.pedantic(one if threads == 1 else two, rounds=ROUNDS, warmup_rounds=2)
    label = f"jungfrau {backend}, {cells}-cell constants, {threads} thread" + "s" * (threads > 1)
    rates.add(label, adc.nbytes, benchmark, reference=JF_REFERENCE if cells == 16 else None)
    assert np.count_nonzero(outs[1]) > 0  # some pixels left G0: both code paths ran


@pytest.mark.benchmark(group="calibrate")
def test_jungfrau_numpy_reference(benchmark, rates, constants, train) -> None:
    corrector = JungfrauCorrector(constants[16], "numpy")
    adc, cell = train["data.adc"], train["data.memoryCell"]
    outs = corrector.empty_outputs(adc.shape[0])
    benchmark.pedantic(corrector.correct, (adc, None, cell, *outs), rounds=3, warmup_rounds=1)
    rates.add(JF_REFERENCE, adc.nbytes, benchmark)
