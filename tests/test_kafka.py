"""Storage events on a real Kafka-protocol broker (tansu, or CALSTREAM_TEST_KAFKA)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from calstream.config import KafkaConfig, load_config
from calstream.errors import ConfigError
from calstream.events import KafkaPublisher, Outbox, storage_event_schema
from calstream.pipeline import Pipeline
from calstream.store import adler32_file
from tests.conftest import free_port
from tests.kafka_fixtures import consume
from tests.test_outbox import make_event

BIN = Path(sys.executable).parent


def kafka_overrides(bootstrap: str, topic: str, **more: object) -> dict[str, object]:
    sets: dict[str, object] = {
        "events__kafka__bootstrap_servers": [bootstrap],
        "events__kafka__topic": topic,
        "events__kafka__retry_interval": 0.2,
        "events__kafka__flush_timeout": 10.0,
    }
    sets.update({f"events__kafka__{k}": v for k, v in more.items()})
    return sets


def check_messages(messages: list, outbox: Outbox) -> None:
    """Every message: schema-valid value, key = path, CloudEvents id = event id, size/adler32."""
    schema = storage_event_schema()
    for msg in messages:
        value = json.loads(msg.value)
        jsonschema.validate(value, schema)
        headers = dict(msg.headers)
        assert headers["ce_specversion"] == b"1.0"
        assert headers["content-type"] == b"application/json"
        assert headers["ce_id"].decode() == value["calstream"]["event_id"]
        assert msg.key.decode() == value["billingPath"] == headers["ce_subject"].decode()
        path = Path(value["billingPath"])
        assert value["fileSize"] == path.stat().st_size
        assert value["calstream"]["checksum"]["adler32"] == adler32_file(path)
        entry = outbox.get(value["calstream"]["event_id"])
        assert entry is not None and entry.value == msg.value


def test_each_stored_file_is_announced_once(make_config, constants_1cell, kafka_bootstrap,
                                            topic, tmp_path):
    config = make_config(
        constants_1cell, simulate__enabled=True, simulate__trains=4, output__trains_per_file=2,
        **kafka_overrides(kafka_bootstrap, topic),
    )
    summary = Pipeline(config).run()
    assert summary.files == 2
    assert (summary.events, summary.events_published, summary.events_pending) == (2, 2, 0)
    assert "2 published to Kafka, 0 pending" in summary.format()
    messages = consume(kafka_bootstrap, topic, 2)
    assert len(messages) == 2
    with Outbox.in_spool(tmp_path / "spool", readonly=True) as outbox:
        check_messages(messages, outbox)
        assert outbox.counts() == {"pending": 0, "sent": 2}
    stored = sorted(str(p) for p in (tmp_path / "data").rglob("*.h5"))
    assert sorted(m.key.decode() for m in messages) == stored


def test_broker_down_at_start_then_started(tansu_factory, topic, tmp_path, caplog):
    """Events wait, the backlog is reported, all arrive once the broker is up, in order."""
    broker = tansu_factory(None)
    config = KafkaConfig(
        bootstrap_servers=(broker.bootstrap,), topic=topic, retry_interval=0.2, warn_every=0.5,
    )
    path = tmp_path / "outbox.sqlite3"
    events = [make_event(n) for n in range(6)]
    with Outbox(path) as outbox:
        for event in events[:3]:
            outbox.add(event)
    caplog.set_level(logging.INFO, logger="calstream")
    publisher = KafkaPublisher(config, path, name="test")
    publisher.start()
    publisher.start()  # twice is fine
    try:
        assert publisher.flush(1.0) == 3
        with Outbox(path) as outbox:  # more events while the broker is away
            for event in events[3:]:
                outbox.add(event)
                publisher.wake()
        time.sleep(0.5)
        assert publisher.stats().pending == 6
        assert not publisher.stats().connected
        assert any("6 storage event(s) wait in the outbox" in r.getMessage()
                   for r in caplog.records)
        broker.start()
        assert publisher.flush(30.0) == 0
        assert publisher.stats().published == 6
    finally:
        publisher.stop()
        publisher.stop()
    messages = consume(broker.bootstrap, topic, 6)
    ids = [m.headers[1][1].decode() for m in messages]
    assert sorted(ids) == sorted(e.id for e in events)  # all of them, none twice
    by_partition: dict[int, list[int]] = {}
    order = {e.id: i for i, e in enumerate(events)}
    for m in messages:
        by_partition.setdefault(m.partition, []).append(order[m.headers[1][1].decode()])
    assert all(seqs == sorted(seqs) for seqs in by_partition.values())
    refusals = [r for r in caplog.records if "refuses idempotent" in r.getMessage()]
    assert len(refusals) <= 1  # tansu refuses: one warning, not one per reconnect


@pytest.mark.slow
def test_broker_lost_while_publishing_then_back(tansu_factory, topic, tmp_path, caplog):
    """The broker goes away after the relay connected: nothing is marked sent without an ack."""
    broker = tansu_factory(None).start()
    config = KafkaConfig(
        bootstrap_servers=(broker.bootstrap,), topic=topic, retry_interval=0.2,
        request_timeout_ms=1500, warn_every=0.5,
    )
    path = tmp_path / "outbox.sqlite3"
    events = [make_event(n) for n in range(6)]
    outbox = Outbox(path)
    caplog.set_level(logging.WARNING, logger="calstream")
    publisher = KafkaPublisher(config, path, name="test")
    publisher.start()
    try:
        outbox.add(events[0])
        publisher.wake()
        assert publisher.flush(20.0) == 0
        broker.stop()
        for event in events[1:]:
            outbox.add(event)
            publisher.wake()
        assert publisher.flush(3.0) == 5  # no ack, nothing marked sent
        assert outbox.counts() == {"pending": 5, "sent": 1}
        broker.start()  # a fresh broker (memory storage) on the same port
        assert publisher.flush(30.0) == 0
    finally:
        publisher.stop()
        outbox.close()
    messages = consume(broker.bootstrap, topic, 5)
    assert sorted(m.headers[1][1].decode() for m in messages) == sorted(e.id for e in events[1:])
    assert any("5 storage event(s) wait" in r.getMessage() for r in caplog.records)
    assert any("Kafka is back" in r.getMessage() for r in caplog.records)


def test_idempotence_on_is_refused_clearly_and_events_wait(kafka_bootstrap, topic, tmp_path):
    if "CALSTREAM_TEST_KAFKA" in os.environ:
        pytest.skip("an external Kafka may well support idempotence")
    config = KafkaConfig(bootstrap_servers=(kafka_bootstrap,), topic=topic, idempotence="on",
                         retry_interval=0.2)
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as outbox:
        outbox.add(make_event(1))
    publisher = KafkaPublisher(config, path)
    publisher.start()
    try:
        assert publisher.flush(1.5) == 1
        stats = publisher.stats()
    finally:
        publisher.stop()
    assert stats.published == 0 and stats.failed_attempts >= 1
    assert 'idempotence = "on"' in (stats.last_error or "")
    with Outbox(path, readonly=True) as outbox:
        (entry,) = outbox.entries()
    assert entry.state == "pending" and entry.attempts >= 1
    assert 'idempotence = "on"' in (entry.last_error or "")


def test_sasl_password_is_never_logged(tmp_path, monkeypatch, caplog, topic):
    monkeypatch.setenv("CALSTREAM_TEST_PW", "hunter2-secret")
    config = load_config(None, [
        f'events.kafka.bootstrap_servers=["127.0.0.1:{free_port()}"]',
        f'events.kafka.topic="{topic}"', "events.kafka.retry_interval=0.1",
        'events.kafka.security_protocol="SASL_PLAINTEXT"', 'events.kafka.sasl_username="u"',
        'events.kafka.sasl_password_env="CALSTREAM_TEST_PW"',
        'events.kafka.sasl_mechanism="SCRAM-SHA-256"',
    ]).events.kafka
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as outbox:
        outbox.add(make_event(1))
    caplog.set_level(logging.DEBUG)
    publisher = KafkaPublisher(config, path)
    publisher.start()
    try:
        assert publisher.flush(0.5) == 1
    finally:
        publisher.stop()
    assert caplog.records
    assert not any("hunter2" in r.getMessage() for r in caplog.records)
    assert "hunter2" not in repr(config) and "hunter2" not in repr(publisher)
    with Outbox(path, readonly=True) as outbox:
        assert "hunter2" not in (outbox.entries()[0].last_error or "")


def test_pipeline_keeps_storing_when_the_broker_is_down(make_config, constants_1cell, topic):
    config = make_config(
        constants_1cell, simulate__enabled=True, simulate__trains=4, output__trains_per_file=2,
        **kafka_overrides(f"127.0.0.1:{free_port()}", topic, flush_timeout=0.5),
    )
    t0 = time.monotonic()
    summary = Pipeline(config).run()
    assert summary.files == 2
    assert (summary.events, summary.events_published, summary.events_pending) == (2, 0, 2)
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_killed_with_events_pending_delivers_after_restart(
    make_config, constants_1cell, kafka_bootstrap, topic, tmp_path
):
    """kill -9 while the broker is unreachable; the restarted run publishes the backlog."""
    spool = tmp_path / "spool"
    toml = tmp_path / "run.toml"
    toml.write_text(
        f"""
[source]
endpoint = "tcp://127.0.0.1:{free_port()}"
[calibration]
constants = "{constants_1cell}"
cells = 1
synthesize_missing = false
[output]
spool = "{spool}"
destination = "file://{tmp_path / 'data'}"
trains_per_file = 1
[simulate]
trains = 100000
rate = 20
[events.kafka]
bootstrap_servers = ["127.0.0.1:{free_port()}"]
topic = "{topic}"
"""
    )
    proc = subprocess.Popen([str(BIN / "calstream"), "run", str(toml)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (spool / "outbox.sqlite3").exists():
                with Outbox.in_spool(spool, readonly=True) as outbox:
                    if outbox.counts()["pending"] >= 3:
                        break
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    with Outbox.in_spool(spool, readonly=True) as outbox:
        waiting = [e.event_id for e in outbox.entries("pending")]
    assert len(waiting) >= 3

    config = load_config(toml, [f'events.kafka.bootstrap_servers=["{kafka_bootstrap}"]'])
    summary = Pipeline(config).run(max_trains=0)
    assert summary.events_pending == 0
    assert summary.events_published >= len(waiting)
    with Outbox.in_spool(spool, readonly=True) as outbox:
        assert outbox.counts()["pending"] == 0
        total = len(outbox.entries())
        messages = consume(kafka_bootstrap, topic, total)
        check_messages(messages, outbox)
    got = {m.headers[1][1].decode() for m in messages}
    assert set(waiting) <= got
    assert len(messages) == total


def test_kafka_config_errors_name_the_key(tmp_path, monkeypatch):
    def error(*sets: str) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(None, list(sets))
        return str(info.value)

    assert "events.kafka.bootstrap_servers[0]: must be HOST:PORT" in error(
        'events.kafka.bootstrap_servers=["nohost"]')
    assert "events.kafka.topic" in error('events.kafka.topic="bad topic"')
    assert "events.kafka.sasl_username: is required" in error(
        'events.kafka.security_protocol="SASL_PLAINTEXT"')
    assert "exactly one of" in error(
        'events.kafka.security_protocol="SASL_PLAINTEXT"', 'events.kafka.sasl_username="u"')
    monkeypatch.delenv("CALSTREAM_TEST_PW", raising=False)
    assert "CALSTREAM_TEST_PW is not set" in error(
        'events.kafka.security_protocol="SASL_PLAINTEXT"', 'events.kafka.sasl_username="u"',
        'events.kafka.sasl_password_env="CALSTREAM_TEST_PW"')
    assert "events.kafka.ssl_cafile: no such file" in error(
        'events.kafka.security_protocol="SSL"', f'events.kafka.ssl_cafile="{tmp_path}/no.pem"')
    assert "unknown key" in error("events.kafka.sasl_password=\"secret\"")

    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    config = load_config(None, [
        'events.kafka.security_protocol="SASL_PLAINTEXT"', 'events.kafka.sasl_username="u"',
        f'events.kafka.sasl_password_file="{secret}"',
        'events.kafka.sasl_mechanism="SCRAM-SHA-512"',
    ]).events.kafka
    assert config.password() == "s3cret"
    assert "s3cret" not in repr(config)
    monkeypatch.setenv("CALSTREAM_TEST_PW", "fromenv")
    config = load_config(None, [
        'events.kafka.security_protocol="SASL_SSL"', 'events.kafka.sasl_username="u"',
        'events.kafka.sasl_password_env="CALSTREAM_TEST_PW"',
    ]).events.kafka
    assert config.password() == "fromenv"
    assert not KafkaConfig().enabled
