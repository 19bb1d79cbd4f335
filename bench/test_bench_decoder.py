"""Ingest: Karabo Bridge 2.2 encode / decode of one 16-cell JUNGFRAU train, and ZeroMQ receive.

Run: ``pytest bench/test_bench_decoder.py --benchmark-only``. The train is one simulated
module (16 MB of ``data.adc`` plus the small per-cell arrays). ``decode`` parses the msgpack
headers and wraps the array frames zero-copy (so its GB/s is large: no bytes are copied);
``receive`` is what the pipeline's receiver thread does per train: a PUSH socket in a thread
sends pre-encoded frames over TCP loopback, :class:`~calstream.ingest.Receiver` (PULL,
``copy=False``) takes and decodes them.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq

from calstream.ingest import JungfrauSimulation, Receiver, decode, encode

CELLS = 16
TRAINS_PER_ROUND = 8


@pytest.fixture(scope="module")
def train() -> tuple[dict, dict, int]:
    sim = JungfrauSimulation(modules=(1,), cells=CELLS, n_distinct=1)
    data, meta = sim.train(10000)
    return data, meta, data[sim.sources[0]]["data.adc"].nbytes


@pytest.mark.benchmark(group="decode")
def test_encode(benchmark, rates, train) -> None:
    data, meta, nbytes = train
    frames = benchmark(encode, data, meta)
    rates.add("karabo bridge encode (sender side), 1 train", nbytes, benchmark)
    assert len(frames) > 2


@pytest.mark.benchmark(group="decode")
def test_decode(benchmark, rates, train) -> None:
    data, meta, nbytes = train
    frames = [bytes(f) for f in encode(data, meta)]
    out, _ = benchmark(decode, frames)
    rates.add("karabo bridge decode (zero-copy), 1 train", nbytes, benchmark)
    source = next(iter(data))
    np.testing.assert_array_equal(out[source]["data.adc"], data[source]["data.adc"])


@pytest.mark.benchmark(group="decode")
def test_receive_zmq(benchmark, rates, train) -> None:
    data, meta, nbytes = train
    frames = encode(data, meta)
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    receiver = Receiver(f"tcp://127.0.0.1:{port}", "pull", context=context,
                        max_array_bytes=2 * nbytes)
    wanted = threading.Semaphore(0)
    done = threading.Event()

    def send() -> None:
        while not done.is_set():
            if wanted.acquire(timeout=0.1):
                push.send_multipart(frames, copy=False)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()

    def receive_round() -> None:
        for _ in range(TRAINS_PER_ROUND):
            wanted.release()
        for _ in range(TRAINS_PER_ROUND):
            assert receiver.receive(timeout=10) is not None

    try:
        benchmark.pedantic(receive_round, rounds=5, warmup_rounds=1)
    finally:
        done.set()
        thread.join()
        receiver.close()
        push.close(linger=0)
        context.term()
    rates.add(f"zeromq PUSH->PULL receive + decode, {TRAINS_PER_ROUND} trains",
              nbytes * TRAINS_PER_ROUND, benchmark)
