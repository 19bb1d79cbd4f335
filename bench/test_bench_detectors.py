"""AGIPD, LPD and ePix100 kernel throughput against a memory copy of the same bytes and the
NumPy reference, in one and two threads.

Run: ``pytest bench --benchmark-only`` (``-k agipd`` etc. to narrow). One train of one module
per detector, with realistic content (dark noise around the per-pixel offsets, ~1 % photon
hits, three bright spots per frame switching gain) and constants for as many cells as the
train has frames (every frame its own cell: the tables do not fit in cache, the hard case):

- AGIPD: 64 frames, file layout (64, 2, 512, 128), 64-cell constants (17 MB raw),
- LPD: 64 frames (64, 256, 256), 64-cell constants (8 MB raw),
- ePix100: 8 frames (8, 704, 768), with and without common mode (8.7 MB raw).

Outputs are preallocated and aligned (:meth:`Corrector.empty_outputs`). Two threads correct
the two halves of the train on a thread pool (the kernels release the GIL). The summary table
at the end gives GB/s of raw input and the ratios to the copy, to NumPy and to one thread.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest

from calstream.calibrate import DetectorConstants, make_corrector
from calstream.calibrate.native import native_available

ROUNDS = 10


@dataclass
class Case:
    name: str
    consts: DetectorConstants
    module_data: dict[str, np.ndarray]
    raw: np.ndarray
    cells: np.ndarray | None

    @property
    def frames(self) -> int:
        return self.raw.shape[0]


def _spots(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Three bright 16 x 16 spots per frame (Bragg peaks): where pixels switch gain."""
    spots = np.zeros(shape, bool)
    for f in range(shape[0]):
        for r, c in zip(rng.integers(0, shape[1] - 16, 3), rng.integers(0, shape[2] - 16, 3),
                        strict=True):  # fmt: skip
            spots[f, r : r + 16, c : c + 16] = True
    return spots


def _agipd(rng: np.random.Generator) -> Case:
    n, ss, fs = 64, 512, 128
    shape = (n, 3, ss, fs)
    offset = rng.normal([5000, 5400, 5600], 150, (ss, fs, n, 3)).transpose(2, 3, 0, 1)
    gain = rng.normal([1.0, 25.0, 112.0], [0.03, 0.8, 4.0], (ss, fs, n, 3)).transpose(2, 3, 0, 1)
    badpix = np.where(rng.random(shape) < 0.005, 1, 0)
    t0 = rng.normal(5900, 30, (n, ss, fs))
    thresholds = np.stack([t0, t0 + 1000], axis=1)
    consts = DetectorConstants.from_kernel("agipd", offset, gain, badpix, thresholds)
    cells = np.arange(n, dtype=np.uint16)
    hits = rng.random((n, ss, fs)) < 0.01
    analog = consts.offset[cells, 0] + rng.normal(0, 5, (n, ss, fs)) + hits * 400
    digital = rng.normal(4500, 20, (n, ss, fs)) + _spots(rng, (n, ss, fs)) * 2000
    image = np.stack([analog, digital], axis=1).clip(0, 65535).astype(np.uint16)
    return Case("agipd", consts, {"image.data": image, "image.cellId": cells[:, None]}, image,
                cells)  # fmt: skip


def _lpd(rng: np.random.Generator) -> Case:
    n, ss, fs = 64, 256, 256
    shape = (n, 3, ss, fs)
    offset = rng.normal([1500, 1600, 1700], 100, (ss, fs, n, 3)).transpose(2, 3, 0, 1)
    gain = rng.normal([1.0, 10.0, 100.0], [0.03, 0.3, 3], (ss, fs, n, 3)).transpose(2, 3, 0, 1)
    badpix = np.where(rng.random(shape) < 0.005, 1, 0)
    consts = DetectorConstants.from_kernel("lpd", offset, gain, badpix)
    cells = np.arange(n, dtype=np.uint16)
    adc = consts.offset[cells, 0] + rng.normal(0, 4, (n, ss, fs))
    adc += (rng.random((n, ss, fs)) < 0.01) * 300
    code = _spots(rng, (n, ss, fs)).astype(np.uint16)
    raw = (adc.clip(0, 0xFFF).astype(np.uint16) | (code << 12)).astype(np.uint16)
    return Case("lpd", consts, {"image.data": raw, "image.cellId": cells}, raw, cells)


def _epix(rng: np.random.Generator) -> Case:
    n, ss, fs = 8, 704, 768
    offset = rng.normal(2500, 100, (1, 1, ss, fs))
    gain = rng.normal(1.0, 0.02, (1, 1, ss, fs))
    badpix = np.where(rng.random((1, 1, ss, fs)) < 0.005, 1, 0)
    consts = DetectorConstants.from_kernel("epix100", offset, gain, badpix)
    raw = consts.offset[0, 0] + rng.normal(0, 3, (n, ss, fs)) + rng.normal(0, 5, (n, ss, 1))
    raw += (rng.random((n, ss, fs)) < 0.01) * 300
    raw = raw.clip(0, 65535).astype(np.uint16)
    return Case("epix100", consts, {"data.image.pixels": raw}, raw, None)


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    rng = np.random.default_rng(0)
    return {"agipd": _agipd(rng), "lpd": _lpd(rng), "epix100": _epix(rng)}


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _copy_label(name: str) -> str:
    return f"memory copy, {name} raw bytes"


def _ref_label(name: str, variant: str) -> str:
    return f"{name}{variant} numpy reference, 1 thread"


NAMES = ["agipd", "lpd", "epix100"]
BACKENDS = [
    pytest.param(
        b, marks=pytest.mark.skipif(b == "cython" and not native_available(), reason="not built")
    )
    for b in ("numba", "cython")
]
#: (detector, variant label, corrector options)
VARIANTS = [
    ("agipd", "", {}),
    ("agipd", " +common mode", {"common_mode": True}),
    ("agipd", " +photons", {"photon_energy": 9.3}),
    ("lpd", "", {}),
    ("epix100", " +common mode", {"common_mode": True}),
    ("epix100", " no common mode", {"common_mode": False}),
]


@pytest.mark.parametrize("name", NAMES)
def test_memory_copy(benchmark, rates, cases, name) -> None:
    benchmark.group = name
    raw = cases[name].raw
    dst = np.empty_like(raw)
    benchmark.pedantic(np.copyto, (dst, raw), rounds=ROUNDS * 5, warmup_rounds=2)
    rates.add(_copy_label(name), raw.nbytes, benchmark, copy=_copy_label(name))


def _run(corrector, case: Case, outs, pool, threads: int):
    half = case.frames // 2

    def part(sl: slice) -> None:
        data = {k: v[sl] for k, v in case.module_data.items()}
        corrector.correct_module(data, *(o[sl] for o in outs))

    if threads == 1:
        return lambda: corrector.correct_module(case.module_data, *outs)

    def two() -> None:
        futures = [pool.submit(part, slice(0, half)), pool.submit(part, slice(half, None))]
        for future in futures:
            future.result()

    return two


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "variant", "options"), VARIANTS, ids=lambda v: str(v).strip())
def test_detector(benchmark, rates, cases, pool, name, variant, options, backend, threads):
    if threads == 2 and variant and "common mode" not in variant:
        pytest.skip("two-thread scaling is measured on the plain variants")
    benchmark.group = name
    case = cases[name]
    corrector = make_corrector(name, case.consts, backend, **options)
    corrector.warmup()
    outs = corrector.empty_outputs(case.frames)
    benchmark.pedantic(_run(corrector, case, outs, pool, threads), rounds=ROUNDS, warmup_rounds=2)
    label = f"{name}{variant} {backend}, {threads} thread" + "s" * (threads > 1)
    rates.add(label, case.raw.nbytes, benchmark, copy=_copy_label(name),
              reference=_ref_label(name, variant))  # fmt: skip
    assert np.count_nonzero(outs[2]) > 0  # bad pixels flagged: the tables were read


@pytest.mark.parametrize(("name", "variant", "options"), VARIANTS, ids=lambda v: str(v).strip())
def test_detector_numpy_reference(benchmark, rates, cases, name, variant, options) -> None:
    benchmark.group = name
    case = cases[name]
    corrector = make_corrector(name, case.consts, "numpy", **options)
    outs = corrector.empty_outputs(case.frames)
    benchmark.pedantic(_run(corrector, case, outs, None, 1), rounds=2, warmup_rounds=0)
    rates.add(_ref_label(name, variant), case.raw.nbytes, benchmark, copy=_copy_label(name))
