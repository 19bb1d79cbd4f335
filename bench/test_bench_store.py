"""Codec speed and ratio on corrected JUNGFRAU data, and WebDAV upload throughput.

Run: ``pytest bench/test_bench_store.py`` (``-k codec`` or ``-k webdav`` to narrow). The data
is one simulated 16-cell train of one module (dark noise, sparse 9 keV photons), corrected
with 16-cell constants: float32 energies (keV) as calstream writes them by default, the same
bit-rounded to 12 mantissa bits, and int16 photon counts (``round(E / 9 keV)``). Each codec
compresses every frame as one chunk (as the pipeline does), in 1 thread and in 2 threads (two
Python threads on the two halves of the train; the codecs release the GIL). The label carries
the compression ratio; the rate is GB/s of uncompressed data.

The WebDAV benchmark PUTs a 64 MB spool file to wsgidav (cheroot) on loopback with the
dCache-like middleware of the tests (token check, adler32 Digest), 1 and 2 uploads at once.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from calstream.calibrate import JungfrauCorrector, load_jungfrau_constants, synth_jungfrau_constants
from calstream.ingest.simulate import JungfrauSimulation
from calstream.store import WebdavSettings, open_destination, parse_codec
from calstream.store.bitround import bitround

CELLS = 16
PHOTON_KEV = 9.0
CODECS = ["bitshuffle-lz4", "lz4", "zstd:1", "zstd:3", "blosc:lz4", "blosc:zstd:3:2", "none"]


@pytest.fixture(scope="module")
def corrected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    path = tmp_path_factory.mktemp("constants") / "jungfrau-16cell.h5"
    consts = load_jungfrau_constants(synth_jungfrau_constants(path, cells=CELLS, seed=0))
    sim = JungfrauSimulation(modules=(1,), cells=CELLS, n_distinct=1,
                             offsets={1: consts.offset}, gains={1: consts.rel_gain})
    data, _ = sim.train(10000)
    raw = data[sim.sources[0]]
    corrector = JungfrauCorrector(consts)
    energy, gain, mask = corrector.empty_outputs(CELLS)
    corrector.correct(raw["data.adc"], None, np.arange(CELLS), energy, gain, mask)
    photons = np.rint(energy / PHOTON_KEV).clip(-32768, 32767).astype(np.int16)
    return {
        "float32": energy,
        "float32 bitround 12": bitround(energy.copy(), 12),
        "int16 photons": photons,
        "uint8 gain": gain,
        "uint32 mask": mask,
    }


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["float32", "float32 bitround 12", "int16 photons",
                                  "uint8 gain", "uint32 mask"])
@pytest.mark.parametrize("spec", CODECS)
@pytest.mark.benchmark(group="compress")
def test_codec(benchmark, rates, corrected, pool, spec, kind, threads) -> None:
    if kind in ("uint8 gain", "uint32 mask") and spec not in ("bitshuffle-lz4", "zstd:1",
                                                              "lz4"):
        pytest.skip("gain and mask: only the likely choices")
    codec = parse_codec(spec)
    frames = corrected[kind]
    bound = codec.max_encoded_size(frames[0].nbytes, frames.itemsize)
    slabs = [np.empty(bound * CELLS, np.uint8) for _ in range(2)]

    def encode(part: np.ndarray, slab: np.ndarray) -> int:
        used = 0
        for frame in part:
            used += codec.encode_into(frame, slab[used:]).nbytes
        return used

    def one() -> int:
        return encode(frames, slabs[0])

    def two() -> int:
        half = CELLS // 2
        return sum(pool.map(encode, (frames[:half], frames[half:]), slabs))

    size = one()
    benchmark.pedantic(one if threads == 1 else two, rounds=5, warmup_rounds=1)
    label = f"{spec} {kind} (ratio {frames.nbytes / size:.2f})"
    rates.add(f"{label}, {threads} thread{'s' if threads > 1 else ''}", frames.nbytes, benchmark)


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory):
    from tests.webdav_fixtures import TOKEN, WebdavServer

    root = tmp_path_factory.mktemp("door")
    server = WebdavServer(root / "door").start()
    token = root / "token"
    token.write_text(TOKEN)
    try:
        yield server, token
    finally:
        server.stop()


@pytest.mark.parametrize("uploads", [1, 2])
@pytest.mark.benchmark(group="store (webdav)")
def test_webdav_upload(benchmark, rates, door, tmp_path: Path, pool, uploads: int) -> None:
    server, token = door
    size = 64 << 20
    files = []
    for i in range(uploads):
        path = tmp_path / f"f{i}.h5"
        path.write_bytes(os.urandom(size))
        files.append(path)
    dest = open_destination(server.url, WebdavSettings(token_file=str(token)))
    counter = iter(range(10**6))

    def run() -> None:
        n = next(counter)
        list(pool.map(lambda p: dest.store(p, f"bench/{uploads}/{n}/{p.name}"), files))

    benchmark.pedantic(run, rounds=4, warmup_rounds=1)
    rates.add(f"webdav PUT to wsgidav, 64 MB files, {uploads} at once", size * uploads, benchmark)
    dest.close()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.benchmark(group="compress")
def test_bitround(benchmark, rates, corrected, pool, threads) -> None:
    """The Numba bit-rounding kernel on a corrected float32 train (in place, GIL released)."""
    work = corrected["float32"].copy()
    half = CELLS // 2

    def one() -> None:
        bitround(work, 12)

    def two() -> None:
        list(pool.map(lambda part: bitround(part, 12), (work[:half], work[half:])))

    benchmark.pedantic(one if threads == 1 else two, rounds=10, warmup_rounds=1)
    label = f"bitround 12 bits, float32, {threads} thread{'s' if threads > 1 else ''}"
    rates.add(label, work.nbytes, benchmark)
