"""Receiver over real ZeroMQ sockets on loopback: REQ, PULL, SUB, timeouts, malformed input."""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
import zmq
from karabo_bridge import ServerInThread

from calstream.errors import CalstreamError, ConfigError, ProtocolError
from calstream.ingest import JungfrauSimulation, Receiver, Sender, encode, run_sender, train_id_of

ANY_PORT = "tcp://127.0.0.1:*"
SRC = "SPB_IRDA_JF4M/DET/JNGFR03:daqOutput"


def small_train(tid: int) -> tuple[dict, dict]:
    data = {SRC: {"data.adc": np.full((2, 4, 8), tid % 65536, np.uint16), "count": tid}}
    return data, {SRC: {"source": SRC, "timestamp.tid": tid}}


@pytest.fixture(scope="module")
def sim() -> JungfrauSimulation:
    return JungfrauSimulation(modules=(3,), cells=2, n_distinct=2, seed=5)


def test_req_against_karabo_bridge_server():
    with ServerInThread(ANY_PORT, sock="REP") as server, \
            Receiver(server.endpoint, "req") as receiver:
        for tid in (100, 101, 102):
            server.feed(*small_train(tid))
        for tid in (100, 101, 102):
            data, meta = receiver.receive(timeout=5)
            assert train_id_of(meta) == tid
            assert data[SRC]["count"] == tid
            np.testing.assert_array_equal(data[SRC]["data.adc"], small_train(tid)[0][SRC][
                "data.adc"])
        assert receiver.messages_received == 3
        assert receiver.bytes_received > 3 * 2 * 4 * 8 * 2


def test_req_usable_after_timeout():
    with ServerInThread(ANY_PORT, sock="REP") as server, \
            Receiver(server.endpoint, "req") as receiver:
        t0 = time.perf_counter()
        assert receiver.receive(timeout=0.2) is None  # the server has nothing to send yet
        assert 0.15 < time.perf_counter() - t0 < 2
        # The request stays outstanding, so the first train fed answers it: nothing lost.
        for tid in (200, 201):
            server.feed(*small_train(tid))
        for tid in (200, 201):
            data, meta = receiver.receive(timeout=5)
            assert train_id_of(meta) == tid
            assert data[SRC]["count"] == tid
        assert receiver.req_resets == 0


def test_req_slow_server_loses_nothing():
    """A REP server slower than the receive() timeout: requests stay outstanding across calls."""
    tids = list(range(300, 305))
    with ServerInThread(ANY_PORT, sock="REP") as server, \
            Receiver(server.endpoint, "req") as receiver:
        def feed() -> None:
            for tid in tids:
                time.sleep(0.5)
                server.feed(*small_train(tid))

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        got, nones = [], 0
        t_end = time.monotonic() + 20
        while len(got) < len(tids) and time.monotonic() < t_end:
            received = receiver.receive(timeout=0.1)
            if received is None:
                nones += 1
            else:
                got.append(train_id_of(received[1]))
        feeder.join(timeout=5)
        assert got == tids
        assert nones > 0  # the receive() timeouts did happen in between
        assert receiver.req_resets == 0
        assert receiver.messages_received == len(tids)


def test_req_reply_timeout_recreates_socket(caplog):
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    try:
        port = rep.bind_to_random_port("tcp://127.0.0.1")
        endpoint = f"tcp://127.0.0.1:{port}"
        with Receiver(endpoint, "req", context=ctx, reply_timeout=0.3) as receiver:
            assert receiver.reply_timeout == 0.3
            # The first request reaches the REP socket, which never answers it.
            t0 = time.monotonic()  # before the request was sent
            t_end = t0 + 10
            while not rep.poll(0) and time.monotonic() < t_end:
                assert receiver.receive(timeout=0.05) is None
            assert rep.recv() == b"next"
            # Until reply_timeout has passed, the request stays outstanding (no new one).
            with caplog.at_level("WARNING", logger="calstream.ingest.receiver"):
                while receiver.req_resets == 0 and time.monotonic() < t_end:
                    assert receiver.receive(timeout=0.05) is None
            assert receiver.req_resets == 1
            assert time.monotonic() - t0 > 0.3
            assert any(endpoint in r.getMessage() and "lost" in r.getMessage()
                       for r in caplog.records)
            # The late reply goes to the closed socket and is dropped; the new socket's
            # request gets the next train.
            rep.send_multipart(encode(*small_train(1)), copy=False)
            while not rep.poll(0) and time.monotonic() < t_end:
                assert receiver.receive(timeout=0.05) is None
            assert rep.recv() == b"next"
            rep.send_multipart(encode(*small_train(2)), copy=False)
            _, meta = receiver.receive(timeout=5)
            assert train_id_of(meta) == 2
            assert receiver.req_resets == 1
            assert receiver.messages_received == 1
    finally:
        rep.close(linger=0)
        ctx.term()


def test_req_malformed_reply_completes_request():
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    try:
        port = rep.bind_to_random_port("tcp://127.0.0.1")
        with Receiver(f"tcp://127.0.0.1:{port}", "req", context=ctx) as receiver:
            t_end = time.monotonic() + 10
            while not rep.poll(0) and time.monotonic() < t_end:
                assert receiver.receive(timeout=0.05) is None
            assert rep.recv() == b"next"
            rep.send(b"\xc1 not msgpack")
            with pytest.raises(ProtocolError):
                receiver.receive(timeout=5)
            # The next receive() sends a fresh request on the same socket.
            while not rep.poll(0) and time.monotonic() < t_end:
                assert receiver.receive(timeout=0.05) is None
            assert rep.recv() == b"next"
            rep.send_multipart(encode(*small_train(3)), copy=False)
            _, meta = receiver.receive(timeout=5)
            assert train_id_of(meta) == 3
            assert receiver.req_resets == 0
    finally:
        rep.close(linger=0)
        ctx.term()


def test_req_against_our_rep_sender(sim):
    with Sender(ANY_PORT, "rep") as sender, Receiver(sender.endpoint, "req") as receiver:
        thread = threading.Thread(target=run_sender, args=(sender, sim),
                                  kwargs={"n_trains": 3, "first_train_id": 7})
        thread.start()
        try:
            tids = [train_id_of(receiver.receive(timeout=5)[1]) for _ in range(3)]
        finally:
            thread.join(timeout=10)
        assert tids == [7, 8, 9]
        assert sender.messages_sent == 3


def test_pull_from_our_sender(sim):
    with Sender(ANY_PORT, "push") as sender, Receiver(sender.endpoint, "pull") as receiver:
        stats = {}
        thread = threading.Thread(target=lambda: stats.update(
            s=run_sender(sender, sim, n_trains=6, first_train_id=500)))
        thread.start()
        got = []
        for _ in range(6):
            data, meta = receiver.receive(timeout=5)
            got.append(train_id_of(meta))
            want, _ = sim.train(got[-1])
            for key in ("data.adc", "data.memoryCell", "data.frameNumber"):
                np.testing.assert_array_equal(data[sim.sources[0]][key],
                                              want[sim.sources[0]][key], err_msg=key)
        thread.join(timeout=10)
        assert got == list(range(500, 506))
        assert stats["s"].trains == 6
        assert receiver.bytes_received == stats["s"].bytes == sender.bytes_sent
        assert receiver.messages_received == 6


def test_sub_from_our_pub_sender(sim):
    with Sender(ANY_PORT, "pub") as sender, Receiver(sender.endpoint, "sub") as receiver:
        # PUB drops messages until the subscription has arrived (slow joiner): resend.
        received = None
        for attempt in range(200):
            sender.send(*sim.train(1000 + attempt))
            received = receiver.receive(timeout=0.05)
            if received is not None:
                break
        assert received is not None
        tid = train_id_of(received[1])
        assert 1000 <= tid < 1200
        np.testing.assert_array_equal(received[0][sim.sources[0]]["data.adc"],
                                      sim.train(tid)[0][sim.sources[0]]["data.adc"])


def test_bound_receiver_with_connecting_sender(sim):
    with Receiver(ANY_PORT, "pull", bind=True) as receiver, \
            Sender(receiver.endpoint, "push", bind=False) as sender:
        assert not receiver.endpoint.endswith("*")
        assert sender.send(*sim.train(42), timeout=5)
        _, meta = receiver.receive(timeout=5)
        assert train_id_of(meta) == 42


def test_timeout_returns_none():
    with Sender(ANY_PORT, "push") as sender, Receiver(sender.endpoint, "pull") as receiver:
        t0 = time.perf_counter()
        assert receiver.receive(timeout=0.05) is None
        assert time.perf_counter() - t0 < 1
        assert receiver.messages_received == 0


def test_malformed_message_then_good_one():
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:
        port = push.bind_to_random_port("tcp://127.0.0.1")
        with Receiver(f"tcp://127.0.0.1:{port}", "pull", context=ctx) as receiver:
            push.send_multipart([msgpack.packb({"source": SRC, "content": "msgpack",
                                                "metadata": {"timestamp.tid": 5}}),
                                 b"\xc1 not msgpack"])
            with pytest.raises(ProtocolError, match="not valid msgpack") as info:
                receiver.receive(timeout=5)
            assert info.value.source == SRC and info.value.train_id == 5
            push.send_multipart(encode(*small_train(6)), copy=False)
            _, meta = receiver.receive(timeout=5)
            assert train_id_of(meta) == 6
            assert receiver.messages_received == 2
    finally:
        push.close(linger=0)
        ctx.term()


def test_unknown_pattern_and_bad_endpoint():
    with pytest.raises(ConfigError, match="pull, sub, req"):
        Receiver("tcp://127.0.0.1:5555", "router")
    with pytest.raises(ConfigError) as info:
        Receiver("tcp://no-such-transport", "pull")
    assert info.value.source == "tcp://no-such-transport"
    with Receiver(ANY_PORT, "pull", bind=True) as taken, pytest.raises(ConfigError) as info:
        Receiver(taken.endpoint, "pull", bind=True)
    assert "bind" in str(info.value)
    for bad in (0, -1.0):
        with pytest.raises(ConfigError) as info:
            Receiver("tcp://127.0.0.1:5555", "req", reply_timeout=bad)
        assert info.value.key == "reply_timeout"


def test_closed_receiver():
    receiver = Receiver("tcp://127.0.0.1:5555", "sub")
    receiver.close()
    receiver.close()
    with pytest.raises(CalstreamError, match="closed"):
        receiver.receive(timeout=0)
