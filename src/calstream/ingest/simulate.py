"""A fast JUNGFRAU simulation: pre-generated realistic trains, re-sent at a target rate.

``karabo-bridge-server-sim`` generates random data for every train and is far too slow for
throughput work. :class:`JungfrauSimulation` generates ``n_distinct`` trains per module once
(vectorised NumPy) and afterwards hands out the same read-only arrays with fresh metadata and
small per-train arrays; :class:`Sender` sends them zero-copy and :func:`run_sender` paces them.

Content of a simulated frame, per pixel and memory cell:

* dark level: the G0 offset (from ``offsets[module]`` in kernel layout (cells, 3, 512, 1024), or
  synthesised around 3000 ADU) plus gaussian noise (~8 ADU, a few noisy pixels);
* sparse photons: Poisson number per frame at uniform positions, each adding
  ``photon_energy_kev * gain_G0`` ADU;
* a few bright spots per frame whose core switches to medium (G1, code 01) or low gain
  (G2, code 11), with the G1/G2 offsets and (negative) relative gains;
* a very rare invalid gain code 10.

ADC values are clipped to 14 bits; in ``"bits"`` gain mode the gain code sits in bits 14-15 of
``data.adc``, in ``"array"`` mode ``data.gain`` holds 0, 1, 3 (2 invalid).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import zmq

from calstream.errors import CalstreamError, ConfigError
from calstream.ingest.karabo_bridge import Data, Metadata, encode

__all__ = [
    "GAIN_MODES",
    "JungfrauSimulation",
    "SendStats",
    "Sender",
    "Simulation",
    "jungfrau_source",
    "make_simulation",
    "run_sender",
    "train_stamp",
]

log = logging.getLogger(__name__)

GAIN_MODES = ("bits", "array")
FRAME_SHAPE = (512, 1024)
_NPIX = FRAME_SHAPE[0] * FRAME_SHAPE[1]
_ADC_MAX = 0x3FFF

# Synthetic constants when none are given (ADU; relative gain in ADU/keV).
_SYNTH_OFFSET = ((3000.0, 300.0), (14000.0, 400.0), (15000.0, 400.0))
_SYNTH_GAIN = ((40.0, 2.0), (-1.5, 0.05), (-0.1, 0.005))
_NOISE_ADU = 8.0
_SPOTS_PER_FRAME = 3.0
_INVALID_FRACTION = 1e-6
_G0_LIMIT_ADU = 14000.0  # G0 switches to G1 above this level (14-bit ADC saturates at 16383)
_G1_FLOOR_ADU = 1500.0  # G1 switches to G2 when its (falling) signal would go below this


class Simulation(Protocol):
    """What :func:`run_sender` sends: pre-generated trains by train id."""

    nbytes_per_train: int

    def train(self, train_id: int) -> tuple[Data, Metadata]: ...


def train_stamp(train_id: int) -> dict[str, Any]:
    """Karabo Bridge timestamp metadata of a train sent now."""
    ns = time.time_ns()
    sec, frac = divmod(ns, 10**9)
    return {"timestamp": ns / 1e9, "timestamp.sec": str(sec),
            "timestamp.frac": f"{frac * 10**9:018d}", "timestamp.tid": int(train_id)}


def make_simulation(detector: str, *, modules: Iterable[int], cells: int,
                    constants: Mapping[int, Any] | None = None,
                    sources: Mapping[int, str] | None = None, detector_id: str = "",
                    gain_mode: str = "bits", style: str = "file", seed: int = 0,
                    n_distinct: int | None = None) -> Simulation:
    """A pre-generated simulation of any registered detector.

    ``constants`` are the modules' constants in kernel layout (as the pipeline loads them);
    the trains are drawn around them. JUNGFRAU (``gain_mode``) may go without (synthetic
    values); the others need them. ``sources`` maps module to input source name (default:
    the registry's raw source with ``detector_id``). ``style``: ``"file"`` or ``"online"``
    stream layout (AGIPD).
    """
    from calstream.calibrate.registry import get_detector

    spec = get_detector(detector)
    modules = tuple(int(m) for m in modules)
    detector_id = detector_id or spec.detector_id
    if sources is None:
        sources = {m: spec.raw_source.format(detector_id=detector_id, module=m)
                   for m in modules}
    if spec.name == "jungfrau":
        sim = JungfrauSimulation(
            modules=modules, cells=cells, gain_mode=gain_mode, detector_id=detector_id,
            seed=seed, n_distinct=n_distinct or 4,
            offsets={m: c.offset for m, c in constants.items()} if constants else None,
            gains={m: c.rel_gain for m, c in constants.items()} if constants else None,
        )
        sim.sources = [sources[m] for m in sim.modules]
        return sim
    from calstream.ingest.detector_sim import DetectorSimulation

    if constants is None:
        raise ConfigError(f"simulating {spec.name} needs the modules' constants",
                          key="constants")
    return DetectorSimulation(spec.name, constants=constants, sources=sources, cells=cells,
                              style=style, n_distinct=n_distinct or 2, seed=seed)


def jungfrau_source(detector_id: str, module: int) -> str:
    """The raw input source name of a JUNGFRAU module.

    E.g. ``SPB_IRDA_JF4M/DET/JNGFR01:daqOutput`` for module 1.
    """
    return f"{detector_id}/DET/JNGFR{module:02d}:daqOutput"


def _memory_cells(cells: int) -> np.ndarray:
    """Storage-cell order of a burst: with 16 cells, JUNGFRAU starts at cell 15 (storageCellStart
    = 15) and continues 0, 1, …, 14."""
    order = np.roll(np.arange(cells, dtype=np.uint8), 1) if cells > 1 else np.zeros(1, np.uint8)
    order.flags.writeable = False
    return order


class _ModuleConstants:
    """Offsets and relative gains of one module: given (kernel layout) or synthetic per pixel."""

    def __init__(self, module: int, offsets: np.ndarray | None, gains: np.ndarray | None,
                 memory_cells: np.ndarray, rng: np.random.Generator) -> None:
        self.offsets = self._check(module, "offsets", offsets, memory_cells)
        self.gains = self._check(module, "gains", gains, memory_cells)
        cells = len(memory_cells)
        # Per-pixel dark noise (ADU), with a few noisy pixels.
        self.noise = rng.lognormal(np.log(_NOISE_ADU), 0.1, FRAME_SHAPE).astype(np.float32)
        self.noise[rng.random(FRAME_SHAPE) < 1e-3] *= 4
        self._cidx: dict[str, np.ndarray] = {}
        for name, table in (("offsets", self.offsets), ("gains", self.gains)):
            if table is not None:
                self._cidx[name] = (memory_cells.astype(np.intp) if table.shape[0] > 1
                                    else np.zeros(cells, np.intp))
        # Synthetic stand-ins, per pixel (G0 offset also per cell, as in real constants).
        self._synth: dict[tuple[str, int], np.ndarray] = {}
        if self.offsets is None:
            mean, sd = _SYNTH_OFFSET[0]
            g0 = rng.standard_normal((cells, *FRAME_SHAPE), dtype=np.float32)
            g0 *= sd
            g0 += mean
            self._synth["offsets", 0] = g0
            for g in (1, 2):
                self._synth["offsets", g] = self._normal(rng, *_SYNTH_OFFSET[g])
        if self.gains is None:
            for g in range(3):
                self._synth["gains", g] = self._normal(rng, *_SYNTH_GAIN[g])

    @staticmethod
    def _normal(rng: np.random.Generator, mean: float, sd: float) -> np.ndarray:
        arr = rng.standard_normal(FRAME_SHAPE, dtype=np.float32)
        arr *= sd
        arr += mean
        return arr

    @staticmethod
    def _check(module: int, name: str, table: np.ndarray | None,
               memory_cells: np.ndarray) -> np.ndarray | None:
        if table is None:
            return None
        table = np.asarray(table)
        if table.ndim != 4 or table.shape[1:] != (3, *FRAME_SHAPE) or table.shape[0] < 1:
            raise ConfigError(f"{name}[{module}] must have the kernel layout (cells, 3, 512, "
                              f"1024). Got {table.shape} instead.", key=name)
        if table.dtype.kind != "f":
            raise ConfigError(f"{name}[{module}] must be floating point. Got {table.dtype} "
                              "instead.", key=name)
        if table.shape[0] > 1 and int(memory_cells.max()) >= table.shape[0]:
            raise ConfigError(f"{name}[{module}] has {table.shape[0]} cells but the "
                              f"simulation uses memory cell {int(memory_cells.max())}", key=name)
        return table

    def g0_offset(self) -> np.ndarray:
        """Dense G0 offsets for every frame of a train, (cells, 512, 1024) float32."""
        if self.offsets is None:
            return self._synth["offsets", 0]
        dense = self.offsets[self._cidx["offsets"], 0].astype(np.float32)
        bad = ~np.isfinite(dense)
        if bad.any():
            dense[bad] = _SYNTH_OFFSET[0][0]
        return dense

    def at(self, name: str, gain: int, frame: np.ndarray, flat: np.ndarray) -> np.ndarray:
        """Constant ``name`` ('offsets' or 'gains') of gain stage ``gain`` at sparse points
        (frame index, flat pixel index), float32, non-finite values replaced by the typical
        value."""
        table = self.offsets if name == "offsets" else self.gains
        if table is None:
            synth = self._synth[name, gain]
            values = (synth.reshape(synth.shape[0], -1)[frame, flat] if synth.ndim == 3
                      else synth.reshape(-1)[flat])
        else:
            cell = self._cidx[name][frame]
            values = table[cell, gain, flat // FRAME_SHAPE[1], flat % FRAME_SHAPE[1]]
        values = np.asarray(values, dtype=np.float32)
        typical = (_SYNTH_OFFSET if name == "offsets" else _SYNTH_GAIN)[gain][0]
        return np.where(np.isfinite(values), values, np.float32(typical))


class JungfrauSimulation:
    """Pre-generated JUNGFRAU raw trains with realistic content, for one or more modules.

    Parameters
    ----------
    modules
        Module numbers (1-based, as in the source names).
    cells
        Memory cells per train (1 or 16 on the real detector; any positive number here).
    gain_mode
        ``"bits"`` (gain code in bits 14-15 of ``data.adc``) or ``"array"`` (``data.gain``).
    detector_id
        Detector part of the source names.
    n_distinct
        Distinct trains generated per module; train ``tid`` reuses number ``tid % n_distinct``.
    seed
        Random seed; each module draws from ``SeedSequence([seed, module])``.
    offsets, gains
        Per module, kernel layout (cells, 3, 512, 1024): offsets in ADU and relative gains in
        ADU/keV (G1/G2 negative). A table with one cell serves every memory cell; with more
        cells, memory cell ``c`` uses entry ``c``. Missing → synthetic values.
    photon_energy_kev
        Energy of the sparse photons.
    photons_per_frame
        Mean number of sparse photons per frame.

    Raises
    ------
    ConfigError
        An invalid parameter or a constants table of the wrong shape.
    """

    def __init__(self, *, modules: Iterable[int] = (1,), cells: int = 16,
                 gain_mode: str = "bits", detector_id: str = "SPB_IRDA_JF4M",
                 n_distinct: int = 4, seed: int = 0,
                 offsets: Mapping[int, np.ndarray] | None = None,
                 gains: Mapping[int, np.ndarray] | None = None,
                 photon_energy_kev: float = 9.0, photons_per_frame: float = 2000) -> None:
        self.modules = tuple(int(m) for m in modules)
        if not self.modules or len(set(self.modules)) != len(self.modules) or min(
                self.modules) < 0:
            raise ConfigError(f"modules must be distinct non-negative numbers. Got "
                              f"{self.modules} instead.", key="modules")
        if cells < 1 or cells > 256:
            raise ConfigError(f"cells must be between 1 and 256. Got {cells} instead.",
                              key="cells")
        if gain_mode not in GAIN_MODES:
            raise ConfigError(f"unknown gain_mode {gain_mode!r}; known: {', '.join(GAIN_MODES)}",
                              key="gain_mode")
        if n_distinct < 1:
            raise ConfigError(f"n_distinct must be at least 1. Got {n_distinct} instead.",
                              key="n_distinct")
        if not photon_energy_kev > 0 or not photons_per_frame >= 0:
            raise ConfigError("photon_energy_kev must be > 0 and photons_per_frame >= 0. Got "
                              f"{photon_energy_kev} and {photons_per_frame} instead.")
        self.cells = cells
        self.gain_mode = gain_mode
        self.detector_id = detector_id
        self.n_distinct = n_distinct
        self.seed = seed
        self.photon_energy_kev = float(photon_energy_kev)
        self.photons_per_frame = float(photons_per_frame)
        self.sources = [jungfrau_source(detector_id, m) for m in self.modules]
        self.memory_cells = _memory_cells(cells)

        t0 = time.perf_counter()
        self._trains: list[list[tuple[np.ndarray, np.ndarray | None]]] = []
        for module in self.modules:
            rng = np.random.default_rng(np.random.SeedSequence([seed, module]))
            consts = _ModuleConstants(module, (offsets or {}).get(module),
                                      (gains or {}).get(module), self.memory_cells, rng)
            g0_offset = consts.g0_offset()
            self._trains.append([self._generate(consts, g0_offset, rng)
                                 for _ in range(n_distinct)])
            del consts, g0_offset
        arrays = [a for per_module in self._trains for pair in per_module for a in pair
                  if a is not None]
        for arr in arrays:
            arr.flags.writeable = False
        self.nbytes_per_train = len(self.modules) * (
            sum(a.nbytes for a in self._trains[0][0] if a is not None)
            + cells * (1 + 8 + 8))
        """Bytes of array data in one train (all modules), without protocol headers."""
        log.info("generated %d distinct trains for %d module(s), %d cells, in %.2f s",
                 n_distinct, len(self.modules), cells, time.perf_counter() - t0)

    def _generate(self, consts: _ModuleConstants, g0_offset: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """One module's train: (adc uint16, gain uint8 or None), vectorised."""
        cells = self.cells
        shape = (cells, *FRAME_SHAPE)
        # Dark level: offset + gaussian noise with the module's per-pixel sigma.
        sigma = consts.noise
        signal = rng.standard_normal(shape, dtype=np.float32)
        signal *= sigma
        signal += g0_offset
        flat_signal = signal.reshape(-1)

        # Sparse photons (G0).
        counts = rng.poisson(self.photons_per_frame, cells)
        frame = np.repeat(np.arange(cells), counts)
        pix = rng.integers(0, _NPIX, frame.size)
        adu = self.photon_energy_kev * consts.at("gains", 0, frame, pix)
        np.add.at(flat_signal, frame * _NPIX + pix, adu)

        # Bright spots: gaussian blobs; G0 where it fits, else G1, else G2.
        gain_idx, gain_code = self._spots(consts, rng, flat_signal, sigma)

        # Very rare invalid gain code 10.
        n_bad = rng.poisson(_INVALID_FRACTION * cells * _NPIX)
        bad_idx = rng.integers(0, cells * _NPIX, n_bad)
        flat_signal[bad_idx] = rng.integers(0, _ADC_MAX + 1, n_bad)
        gain_idx = np.concatenate([gain_idx, bad_idx])
        gain_code = np.concatenate([gain_code, np.full(n_bad, 2, np.uint8)])

        np.rint(signal, out=signal)
        np.clip(signal, 0, _ADC_MAX, out=signal)
        adc = signal.astype(np.uint16)
        del signal, flat_signal
        if self.gain_mode == "bits":
            flat_adc = adc.reshape(-1)
            flat_adc[gain_idx] |= gain_code.astype(np.uint16) << 14
            return adc, None
        gain = np.zeros(shape, np.uint8)
        gain.reshape(-1)[gain_idx] = gain_code
        return adc, gain

    def _spots(self, consts: _ModuleConstants, rng: np.random.Generator,
               flat_signal: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add bright spots to ``flat_signal``; return (flat index, gain code) of switched
        pixels."""
        ny, nx = FRAME_SHAPE
        frames, pixels, energies = [], [], []
        for cell in range(self.cells):
            for _ in range(rng.poisson(_SPOTS_PER_FRAME)):
                width = rng.uniform(1.0, 4.0)
                peak_kev = 10 ** rng.uniform(2.0, 5.2)
                half = int(np.ceil(3 * width))
                cy, cx = rng.integers(0, ny), rng.integers(0, nx)
                ys = np.arange(max(cy - half, 0), min(cy + half + 1, ny))
                xs = np.arange(max(cx - half, 0), min(cx + half + 1, nx))
                yy, xx = np.meshgrid(ys, xs, indexing="ij")
                r2 = (yy - cy) ** 2 + (xx - cx) ** 2
                frames.append(np.full(r2.size, cell))
                pixels.append((yy * nx + xx).ravel())
                energies.append((peak_kev * np.exp(-r2 / (2 * width**2))).ravel())
        if not frames:
            return np.zeros(0, np.intp), np.zeros(0, np.uint8)
        frame = np.concatenate(frames)
        pix = np.concatenate(pixels)
        energy = np.concatenate(energies).astype(np.float32)
        flat = frame * _NPIX + pix
        # Overlapping spots: keep one energy per pixel (the last) so each pixel has one gain.
        flat, keep = np.unique(flat[::-1], return_index=True)
        keep = len(frame) - 1 - keep
        frame, pix, energy = frame[keep], pix[keep], energy[keep]

        g0_level = flat_signal[flat] + energy * consts.at("gains", 0, frame, pix)
        off1 = consts.at("offsets", 1, frame, pix)
        g1_level = off1 + energy * consts.at("gains", 1, frame, pix)
        g2_level = consts.at("offsets", 2, frame, pix) + energy * consts.at(
            "gains", 2, frame, pix)
        in_g0 = g0_level < _G0_LIMIT_ADU
        in_g1 = ~in_g0 & (g1_level > _G1_FLOOR_ADU)  # the rest is G2
        noise = rng.standard_normal(flat.size).astype(np.float32) * sigma.reshape(-1)[pix]
        flat_signal[flat] = np.where(in_g0, g0_level,
                                     np.where(in_g1, g1_level, g2_level) + noise)
        switched = ~in_g0
        codes = np.where(in_g1, np.uint8(1), np.uint8(3))[switched].astype(np.uint8)
        return flat[switched], codes

    def train(self, train_id: int) -> tuple[Data, Metadata]:
        """The train ``train_id``: pre-generated arrays, fresh metadata and small arrays.

        Returns
        -------
        data, metadata
            As :func:`~calstream.ingest.karabo_bridge.decode` returns them. ``data.adc`` (and
            ``data.gain``) are shared, read-only arrays.
        """
        stamp = train_stamp(train_id)
        ns = int(stamp["timestamp"] * 1e9)
        frame_number = np.arange(self.cells, dtype=np.uint64) + np.uint64(
            train_id * self.cells)
        frame_time = ns / 1e9 + np.arange(self.cells, dtype=np.float64) * 1e-6
        data: Data = {}
        metadata: Metadata = {}
        for source, distinct in zip(self.sources, self._trains, strict=True):
            adc, gain = distinct[train_id % self.n_distinct]
            props: dict[str, Any] = {"data.adc": adc}
            if gain is not None:
                props["data.gain"] = gain
            props["data.memoryCell"] = self.memory_cells
            props["data.frameNumber"] = frame_number
            props["data.timestamp"] = frame_time
            data[source] = props
            metadata[source] = {"source": source, **stamp}
        return data, metadata

    def __repr__(self) -> str:
        return (f"<JungfrauSimulation modules={self.modules} cells={self.cells} "
                f"gain_mode={self.gain_mode!r} n_distinct={self.n_distinct}>")


SENDER_PATTERNS: dict[str, int] = {"push": zmq.PUSH, "pub": zmq.PUB, "rep": zmq.REP}
_REQUEST = b"next"


class Sender:
    """Send trains as Karabo Bridge protocol 2.2 messages, zero-copy.

    Parameters
    ----------
    endpoint
        ZeroMQ endpoint; ``tcp://127.0.0.1:*`` with ``bind=True`` binds a free port
        (:attr:`endpoint` names it).
    pattern
        ``"push"``, ``"pub"`` or ``"rep"`` (answers each ``b"next"`` request with a train).
    bind
        Bind (the default) or connect.
    hwm
        Send high-water mark in messages.
    context
        ZeroMQ context; default ``zmq.Context.instance()``.
    linger
        Seconds :meth:`close` waits for queued trains to reach a receiver; without it the last
        trains of a finite run are silently dropped.
    """

    def __init__(self, endpoint: str, pattern: str = "push", *, bind: bool = True,
                 hwm: int = 4, context: zmq.Context | None = None,
                 linger: float = 10.0) -> None:
        if pattern not in SENDER_PATTERNS:
            raise ConfigError(f"unknown sender pattern {pattern!r}; known: "
                              f"{', '.join(SENDER_PATTERNS)}", key="pattern")
        if hwm < 1:
            raise ConfigError(f"hwm must be at least 1. Got {hwm} instead.", key="hwm")
        self.pattern = pattern
        self.bind = bind
        self.linger = linger
        self.bytes_sent = 0
        self.messages_sent = 0
        # Our own context unless given one: closing it is what makes ZeroMQ honour the linger
        # (a process that exits with a shared context still open drops the queued trains).
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._socket: zmq.Socket | None = self._context.socket(SENDER_PATTERNS[pattern])
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.SNDHWM, hwm)
            if bind:
                self._socket.bind(endpoint)
                endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(linger=0)
            if self._own_context:
                self._context.term()
            raise ConfigError(f"cannot {'bind' if bind else 'connect'} a {pattern.upper()} "
                              f"socket: {exc}", source=endpoint) from exc
        self.endpoint = endpoint

    def send(self, data: Data, metadata: Metadata | None = None, *,
             timeout: float | None = None) -> bool:
        """Send one train.

        For ``"rep"`` this first waits for a ``b"next"`` request (anything else is answered with
        an error reply and ignored). ``timeout`` (seconds, None = for ever) bounds the wait for a
        request or for room in the send queue; PUB never waits (ZeroMQ drops for slow
        subscribers).

        Returns
        -------
        bool
            True if sent, False if the timeout passed first.
        """
        sock = self._socket
        if sock is None:
            raise CalstreamError("sender is closed", source=self.endpoint)
        frames = encode(data, metadata)
        deadline = None if timeout is None else time.perf_counter() + timeout
        try:
            if self.pattern == "rep":
                while True:
                    if not sock.poll(_remaining_ms(deadline), zmq.POLLIN):
                        return False
                    request = sock.recv()
                    if request == _REQUEST:
                        break
                    log.warning("%s: unexpected request %r", self.endpoint, request[:40])
                    sock.send(b"Error: bad request " + request[:40])
            elif self.pattern == "push" and not sock.poll(_remaining_ms(deadline), zmq.POLLOUT):
                return False
            sock.send_multipart(frames, copy=False)
        except zmq.ZMQError as exc:
            raise CalstreamError(f"ZeroMQ error on {self.pattern.upper()} socket: {exc}",
                                 source=self.endpoint) from exc
        self.messages_sent += 1
        self.bytes_sent += sum(memoryview(f).nbytes for f in frames)
        return True

    def close(self) -> None:
        """Close the socket, waiting up to ``linger`` s for queued trains (safe to call twice)."""
        if self._socket is not None:
            self._socket.close(linger=int(self.linger * 1000))
            self._socket = None
            if self._own_context:
                self._context.term()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Sender {self.pattern.upper()} {self.endpoint}>"


def _remaining_ms(deadline: float | None) -> int | None:
    if deadline is None:
        return None
    return max(0, round((deadline - time.perf_counter()) * 1000))


@dataclass(frozen=True)
class SendStats:
    """What :func:`run_sender` sent: trains, bytes (incl. headers) and wall-clock seconds."""

    trains: int
    bytes: int
    seconds: float

    @property
    def rate_hz(self) -> float:
        """Trains per second."""
        return self.trains / self.seconds if self.seconds > 0 else 0.0

    @property
    def gbytes_per_s(self) -> float:
        """Throughput in GB/s (10**9 bytes)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


_MAX_LAG_S = 1.0
_POLL_S = 0.1


def _send_until_stopped(sender: Sender, data: Data, metadata: Metadata,
                        stopped: Callable[[], bool]) -> bool:
    """Send one train, checking ``stopped`` every 0.1 s while the socket is not ready."""
    while not sender.send(data, metadata, timeout=_POLL_S):
        if stopped():
            return False
    return True


def run_sender(sender: Sender, simulation: Simulation, *, n_trains: int | None = None,
               rate_hz: float | None = None, first_train_id: int = 10000,
               stop: threading.Event | None = None) -> SendStats:
    """Send simulated trains with consecutive train ids, optionally paced.

    Parameters
    ----------
    sender, simulation
        Where to send and what.
    n_trains
        How many trains; None sends until ``stop`` is set.
    rate_hz
        Target train rate; None sends as fast as the socket takes them (PUSH and REP are paced
        by the receiver, PUB by nothing). Pacing follows a deadline schedule (train ``i`` is due
        at ``start + i / rate_hz``), so send time does not accumulate as drift; a sender that
        falls more than 1 s behind re-anchors the schedule instead of bursting.
    first_train_id
        Train id of the first train.
    stop
        Set it to end the loop early (checked while waiting, at least every 0.1 s).

    Returns
    -------
    SendStats
    """
    if rate_hz is not None and not rate_hz > 0:
        raise ConfigError(f"rate_hz must be > 0 or None. Got {rate_hz} instead.", key="rate_hz")
    period = 1.0 / rate_hz if rate_hz else 0.0
    stopped = stop.is_set if stop is not None else (lambda: False)
    bytes0 = sender.bytes_sent
    start = time.perf_counter()
    due = start
    sent = 0
    while (n_trains is None or sent < n_trains) and not stopped():
        if period:
            delay = due - time.perf_counter()
            if delay > 0:
                if stop is not None:
                    if stop.wait(delay):
                        break
                else:
                    time.sleep(delay)
            elif delay < -_MAX_LAG_S:
                due = time.perf_counter()
            due += period
        data, metadata = simulation.train(first_train_id + sent)
        if not _send_until_stopped(sender, data, metadata, stopped):
            break
        sent += 1
    seconds = time.perf_counter() - start
    stats = SendStats(trains=sent, bytes=sender.bytes_sent - bytes0, seconds=seconds)
    log.info("sent %d trains, %.3f GB in %.2f s (%.1f Hz, %.2f GB/s)", stats.trains,
             stats.bytes / 1e9, seconds, stats.rate_hz, stats.gbytes_per_s)
    return stats
