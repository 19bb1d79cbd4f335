"""The shipping consumer and the Kafka CLI commands, against a real broker."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from calstream.cli import main
from calstream.config import KafkaConfig, ShipConfig
from calstream.errors import ChecksumMismatch
from calstream.events import Outbox
from calstream.events.tail import tail_events
from calstream.pipeline import Pipeline
from calstream.ship import Shipper
from calstream.store import adler32_file
from tests.test_kafka import kafka_overrides


def produce_raw(bootstrap: str, topic: str, value: bytes) -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, value, key=b"other")
        finally:
            await producer.stop()

    asyncio.run(run())


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_shippers_in_a_group_copy_each_file_once(
    make_config, constants_1cell, kafka_bootstrap, topic, tmp_path
):
    produce_raw(kafka_bootstrap, topic, b"not a storage event")  # creates the topic, too
    kafka = KafkaConfig(bootstrap_servers=(kafka_bootstrap,), topic=topic)
    remote = tmp_path / "remote"
    ship = ShipConfig(destination=f"file://{remote}", group_id=f"g-{topic}")
    shippers = [Shipper(kafka, ship, name=f"ship{i}") for i in range(2)]
    errors: list[BaseException] = []

    def run(shipper: Shipper) -> None:
        try:
            shipper.run()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in shippers]
    for thread in threads:
        thread.start()
    try:
        # both members own partitions before any file is announced
        wait_until(lambda: all(s.assignment for s in shippers)
                   and not (shippers[0].assignment & shippers[1].assignment)
                   and len(shippers[0].assignment | shippers[1].assignment) >= 2)
        config = make_config(
            constants_1cell, simulate__enabled=True, simulate__trains=8,
            output__trains_per_file=1, **kafka_overrides(kafka_bootstrap, topic),
        )
        summary = Pipeline(config).run()
        assert summary.files == 8 and summary.events_published == 8
        wait_until(lambda: sum(s.summary.copied for s in shippers) >= 8 or bool(errors))
        time.sleep(0.5)  # a duplicate copy would show now
    finally:
        for shipper in shippers:
            shipper.stop()
        for thread in threads:
            thread.join(timeout=30)
    assert not errors
    assert [s.summary.copied for s in shippers] != [8, 0] and all(
        s.summary.copied for s in shippers)
    assert sum(s.summary.copied for s in shippers) == 8
    assert sum(s.summary.skipped for s in shippers) == 0
    assert sum(s.summary.ignored for s in shippers) == 1
    originals = sorted((tmp_path / "data").rglob("*.h5"))
    copies = sorted(remote.rglob("*.h5"))
    assert [p.relative_to(remote) for p in copies] == [
        p.relative_to(tmp_path / "data") for p in originals]
    for original, copy in zip(originals, copies, strict=True):
        assert adler32_file(copy) == adler32_file(original)
        assert copy.stat().st_ino != original.stat().st_ino  # a copy, not a hard link

    # another group (another site's shipper) finds identical copies and skips them
    fresh = Shipper(kafka, ShipConfig(destination=ship.destination, group_id=f"h-{topic}",
                                      idle_timeout=1.0)).run()
    assert (fresh.copied, fresh.skipped, fresh.ignored) == (0, 8, 1)


def test_tampered_source_is_not_shipped(make_config, constants_1cell, tmp_path):
    """The copy is checked against the event; a mismatch leaves no copy and is not retried."""
    config = make_config(constants_1cell, simulate__enabled=True, simulate__trains=1)
    Pipeline(config).run()
    with Outbox.in_spool(tmp_path / "spool", readonly=True) as outbox:
        (entry,) = outbox.entries()
    (original,) = (tmp_path / "data").rglob("*.h5")
    with open(original, "r+b") as f:  # corrupt one byte at the first site
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    kafka = KafkaConfig(bootstrap_servers=("127.0.0.1:9",), topic="t")
    remote = tmp_path / "remote"
    shipper = Shipper(kafka, ShipConfig(destination=f"file://{remote}"))
    with pytest.raises(ChecksumMismatch, match="adler32") as info:
        shipper._ship_one(entry.value)
    assert not info.value.retriable
    assert not [p for p in remote.rglob("*") if p.is_file()]
    shipper._ship_one(b'{"msgType": "transfer"}')  # someone else's message: ignored
    assert (shipper.summary.copied, shipper.summary.ignored) == (0, 1)


def test_events_cli_tail_replay_publish(make_config, constants_1cell, kafka_bootstrap, topic,
                                        tmp_path, capsys):
    config = make_config(
        constants_1cell, simulate__enabled=True, simulate__trains=2, output__trains_per_file=1,
        **kafka_overrides(kafka_bootstrap, topic),
    )
    start = time.time()
    Pipeline(config).run()
    kafka = KafkaConfig(bootstrap_servers=(kafka_bootstrap,), topic=topic)
    lines: list[str] = []
    assert tail_events(kafka, lines.append, from_beginning=True, count=2) == 2
    spool = tmp_path / "spool"
    with Outbox.in_spool(spool, readonly=True) as outbox:
        ids = [e.event_id for e in outbox.entries()]
        paths = [e.key for e in outbox.entries()]
    assert sorted(paths) == sorted(line.split()[2] for line in lines)
    assert all(any(i in line for line in lines) for i in ids)

    assert main(["events", "list", str(spool)]) == 0
    assert "2 events: 0 pending, 2 sent" in capsys.readouterr().out
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start - 1))
    assert main(["events", "replay", str(spool), "--since", since]) == 0
    assert "2 event(s)" in capsys.readouterr().out
    with Outbox.in_spool(spool, readonly=True) as outbox:
        assert outbox.counts()["pending"] == 2
    toml = tmp_path / "c.toml"
    toml.write_text(f'[output]\nspool = "{spool}"\n[events.kafka]\n'
                    f'bootstrap_servers = ["{kafka_bootstrap}"]\ntopic = "{topic}"\n')
    assert main(["events", "publish", str(toml), "--timeout", "20"]) == 0
    assert "2 event(s) published, 0 pending" in capsys.readouterr().out
    assert main(["events", "tail", "--kafka", kafka_bootstrap, "--topic", topic,
                 "--from-beginning", "-n", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    for event_id in ids:  # the replayed events carry their original ids
        assert sum(event_id in line for line in out) == 2
    assert main(["events", "tail", "--topic", topic]) == 2  # no broker given: clear error
    assert "--kafka" in capsys.readouterr().err
    assert Path(paths[0]).exists()
