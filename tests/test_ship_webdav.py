"""The shipping consumer with WebDAV doors on both sides (wsgidav), through a real broker."""

from __future__ import annotations

import io
import logging
import os
import threading
import tracemalloc
from pathlib import Path

import pytest

from calstream.config import KafkaConfig, ShipConfig
from calstream.errors import ChecksumMismatch, StoreError
from calstream.events import Outbox
from calstream.pipeline import Pipeline
from calstream.ship import Shipper
from calstream.store import WebdavDestination, WebdavSettings, open_destination
from tests.test_kafka import kafka_overrides
from tests.test_webdav import RELPATH, adler, fast
from tests.webdav_fixtures import TOKEN, WebdavServer


@pytest.fixture
def door_b(tmp_path: Path):
    """The second site: another wsgidav door."""
    server = WebdavServer(tmp_path / "door-b").start()
    try:
        yield server
    finally:
        server.stop()


def to_door_a(make_config, constants, door: WebdavServer, token_file: Path, **more):
    return make_config(
        constants, simulate__enabled=True, output__destination=door.url,
        output__token_file=str(token_file), output__store_deadline=5.0, **more,
    )


def h5_files(server: WebdavServer) -> dict[str, bytes]:
    return {k: v for k, v in server.files().items() if k.endswith(".h5")}


@pytest.mark.slow
def test_pipeline_door_kafka_ship_door(make_config, constants_1cell, webdav, door_b,
                                       token_file, kafka_bootstrap, topic, tmp_path, caplog):
    """pipeline -> door A -> Kafka -> ship -> door B (and -> a directory): verified copies."""
    caplog.set_level(logging.INFO)
    config = to_door_a(make_config, constants_1cell, webdav, token_file, simulate__trains=3,
                       output__trains_per_file=1, output__uploads=1,  # events in file order
                       **kafka_overrides(kafka_bootstrap, topic))
    summary = Pipeline(config).run()
    assert summary.files == 3 and summary.events_published == 3
    originals = h5_files(webdav)
    assert len(originals) == 3

    # a shipper killed while copying the first file left its hidden partial copy at door B
    stale = door_b.root / "r0001"
    stale.mkdir()
    (stale / ".CORR-R0001-JNGFR01-S00000.h5.part-0123abcd").write_bytes(b"partial")
    (stale / ".CORR-R0001-JNGFR01-S00099.h5.part-0123abcd").write_bytes(b"not ours")
    kafka = KafkaConfig(bootstrap_servers=(kafka_bootstrap,), topic=topic)
    source = WebdavSettings(token_file=str(token_file))
    to_door = Shipper(kafka, ShipConfig(destination=door_b.url, token_file=str(token_file),
                                        group_id=f"b-{topic}", idle_timeout=1.0,
                                        staging=str(tmp_path / "staging")), source=source)
    # another site, a directory: the staged download is linked into place
    remote = tmp_path / "remote"
    to_dir = Shipper(kafka, ShipConfig(destination=f"file://{remote}", group_id=f"d-{topic}",
                                       idle_timeout=1.0), source=source)
    gets = webdav.faults.requests["GET"]
    results: dict[str, object] = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s.ship.group_id, s.run()))
               for s in (to_door, to_dir)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 2
    for shipper in (to_door, to_dir):
        summary = shipper.summary
        assert (summary.copied, summary.skipped, summary.ignored) == (3, 0, 0)
    assert webdav.faults.requests["GET"] - gets == 6  # read from door A, one GET per copy
    # same names, same bytes; the partial copy of the first file is gone, not another's
    assert door_b.files() == {**originals,
                              "r0001/.CORR-R0001-JNGFR01-S00099.h5.part-0123abcd": b"not ours"}
    assert not list((tmp_path / "staging").iterdir())
    copies = {str(p.relative_to(remote)): p.read_bytes()
              for p in remote.rglob("*.h5") if ".calstream-staging" not in p.parts}
    assert copies == originals
    assert not list((remote / ".calstream-staging").iterdir())
    assert TOKEN not in caplog.text

    # the same events again (a replay, another group): identical copies, nothing copied
    with Outbox.in_spool(tmp_path / "spool", readonly=True) as outbox:
        values = [e.value for e in outbox.entries()]
    puts, gets = door_b.faults.requests["PUT"], webdav.faults.requests["GET"]
    for shipper in (Shipper(kafka, to_door.ship, source=source),
                    Shipper(kafka, to_dir.ship, source=source)):
        for value in values:
            shipper._ship_one(value)
        assert (shipper.summary.copied, shipper.summary.skipped) == (0, 3)
    assert door_b.faults.requests["PUT"] == puts and webdav.faults.requests["GET"] == gets


def one_event(make_config, constants, door: WebdavServer, token_file: Path,
              tmp_path: Path) -> bytes:
    Pipeline(to_door_a(make_config, constants, door, token_file, simulate__trains=1)).run()
    with Outbox.in_spool(tmp_path / "spool", readonly=True) as outbox:
        (entry,) = outbox.entries()
    return entry.value


def corrupt(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_download_that_differs_from_the_event_is_not_stored(
    make_config, constants_1cell, webdav, door_b, token_file, tmp_path
):
    value = one_event(make_config, constants_1cell, webdav, token_file, tmp_path)
    (original,) = (tmp_path / "door").rglob("*.h5")
    corrupt(original)
    kafka = KafkaConfig(bootstrap_servers=("127.0.0.1:9",), topic="t")
    staging = tmp_path / "staging"
    shipper = Shipper(kafka, ShipConfig(destination=door_b.url, token_file=str(token_file),
                                        staging=str(staging)),
                      source=WebdavSettings(token_file=str(token_file)))
    with pytest.raises(ChecksumMismatch, match="the event says") as info:
        shipper._ship_one(value)
    assert info.value.retriable  # a transfer may have spoilt it: the retries try again
    assert door_b.files() == {} and not list(staging.iterdir())
    assert shipper.summary.copied == 0


def test_mismatched_copy_at_a_webdav_target_is_removed(
    make_config, constants_1cell, door_b, token_file, tmp_path
):
    """A file:// source changed after its event: the WebDAV copy made from it is deleted."""
    Pipeline(make_config(constants_1cell, simulate__enabled=True, simulate__trains=1)).run()
    with Outbox.in_spool(tmp_path / "spool", readonly=True) as outbox:
        (entry,) = outbox.entries()
    (original,) = (tmp_path / "data").rglob("*.h5")
    corrupt(original)
    kafka = KafkaConfig(bootstrap_servers=("127.0.0.1:9",), topic="t")
    shipper = Shipper(kafka, ShipConfig(destination=door_b.url, token_file=str(token_file)))
    with pytest.raises(ChecksumMismatch, match="adler32") as info:
        shipper._ship_one(entry.value)
    assert not info.value.retriable
    assert door_b.files() == {}
    assert door_b.faults.requests["DELETE"] >= 1


def test_download_streams_and_has_copy_checks(webdav: WebdavServer, token_file, tmp_path):
    """GET in blocks (never the whole file in memory); HEAD-based identical-copy check."""
    data = os.urandom(24 << 20)
    (webdav.root / "r0001").mkdir(parents=True)
    (webdav.root / RELPATH).write_bytes(data)
    dest = open_destination(webdav.url, fast(token_file))
    assert isinstance(dest, WebdavDestination)
    out = tmp_path / "copy.h5"
    tracemalloc.start()
    try:
        with open(out, "wb") as f:
            nbytes, ours, theirs = dest.download(f"{webdav.url}/{RELPATH}", f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 1e6:.1f} MB for a 25 MB file"
    assert (nbytes, ours, theirs) == (len(data), adler(data), adler(data))
    assert out.read_bytes() == data
    assert dest.has_copy(RELPATH, len(data), adler(data))
    assert not dest.has_copy(RELPATH, len(data) + 1, adler(data))
    assert not dest.has_copy(RELPATH, len(data), "00000001")
    assert not dest.has_copy("r0001/CORR-R0001-JNGFR01-S00001.h5", len(data), adler(data))
    webdav.faults.no_digest = True  # a door without digests: the file is read back
    assert dest.has_copy(RELPATH, len(data), adler(data))
    with pytest.raises(StoreError, match="404"):
        dest.download(f"{webdav.url}/r0001/missing.h5", io.BytesIO())
    dest.remove(RELPATH)
    assert webdav.files() == {}


def test_ship_webdav_settings_from_the_config(tmp_path):
    from calstream.config import load_config

    toml = tmp_path / "ship.toml"
    toml.write_text(
        '[output]\ndestination = "davs://a.example:2880/pnfs/a"\ntoken_file = "/a/token"\n'
        'ca_bundle = "/a/ca"\nstore_timeout = 7.0\n'
        '[ship]\ndestination = "davs://b.example:2880/pnfs/b"\ntoken_file = "/b/token"\n'
        'store_deadline = 30.0\nupload_rename = false\n'
    )
    config = load_config(toml)
    target = config.ship.webdav_settings()
    assert (target.token_file, target.deadline, target.rename) == ("/b/token", 30.0, False)
    source = config.ship.source_webdav_settings(config.output)
    assert (source.token_file, source.ca_bundle, source.timeout) == ("/a/token", "/a/ca", 7.0)
    config = load_config(toml, ["ship.source_token_file=/c/token"])
    assert config.ship.source_webdav_settings(config.output).token_file == "/c/token"
