"""Storage events: dCache billing record shape, JSON Schema, CloudEvents headers."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import calstream.events
from calstream.errors import ConfigError, EventError
from calstream.events import (
    EventSettings,
    StorageEvent,
    build_storage_event,
    storage_event_schema,
)
from calstream.store.records import FileInfo, StoredFile

try:
    import jsonschema
except ImportError:  # in the test extra; without it only the schema checks are skipped
    jsonschema = None
needs_jsonschema = pytest.mark.skipif(jsonschema is None, reason="jsonschema not installed")

EXAMPLES = Path("/work/shared/examples")
WRITE_EXAMPLE = {
    # the shape of /work/shared/examples/dcache-billing-transfer-write.json (dCache's
    # MoverInfoMessageSerializer), inlined so the tests do not depend on that folder
    "version": "1.0",
    "msgType": "transfer",
    "date": "2026-07-01T12:00:05.123+02:00",
    "queuingTime": 0,
    "cellName": "pool1",
    "cellType": "pool",
    "cellDomain": "pool1Domain",
    "meanWriteBandwidth": 120000000.0,
    "writeIdle": "PT0.01S",
    "writeActive": "PT2.1S",
    "localEndpoint": "10.0.0.5:20011",
    "status": {"code": 0, "msg": ""},
    "session": "pool:pool1@pool1Domain:1782900005123-42",
    "subject": ["UidPrincipal[1000]", "GidPrincipal[1000,primary]"],
    "pnfsid": "0000A1B2",
    "billingPath": "/data/calib/run42/cal.h5",
    "fileSize": 268435456,
    "storageInfo": "calib:raw@osm",
    "transferSize": 268435456,
    "transferTime": 2150,
    "isWrite": "write",
    "protocolInfo": {
        "protocol": "Http",
        "versionMajor": 1,
        "versionMinor": 1,
        "transferTag": "",
        "port": 51234,
        "host": "10.0.0.9",
    },
    "initiator": "door:WebDAV-door1@webdavDomain:AAZ:1782900002000000",
    "isP2p": False,
    "transferPath": "/data/calib/run42/cal.h5",
}
CE_HEADERS = {
    "ce_specversion",
    "ce_id",
    "ce_source",
    "ce_type",
    "ce_time",
    "ce_subject",
    "content-type",
}


def make_info(**changes) -> FileInfo:
    fields = dict(
        path=Path("/spool/complete/CORR-R0042-JNGFR01-S00003.h5"),
        relpath="r0042/CORR-R0042-JNGFR01-S00003.h5",
        size=268435456,
        run=42,
        proposal=900001,
        sequence=3,
        detector="jungfrau",
        module=1,
        sources=("SPB_IRDA_JF4M/CORR/JNGFR01:output",),
        first_train=10000,
        last_train=10099,
        trains=100,
        frames=1600,
        compression={"adc": "bitshuffle-lz4", "gain": "bitshuffle-lz4", "mask": "none"},
        constants={"file": "/constants/jf.h5", "sha256": "ab" * 32},
    )
    fields.update(changes)
    return FileInfo(**fields)


def make_stored(**changes) -> StoredFile:
    fields = dict(
        url="file:///data/r0042/CORR-R0042-JNGFR01-S00003.h5",
        path="/data/r0042/CORR-R0042-JNGFR01-S00003.h5",
        size=268435456,
        adler32="1a2b3c4d",
        transfer_time_s=2.15,
        protocol="file",
    )
    fields.update(changes)
    return StoredFile(**fields)


@pytest.fixture
def event() -> StorageEvent:
    return build_storage_event(make_stored(), make_info(), EventSettings())


def validate(value: dict) -> None:
    """Validate against the shipped schema (no-op without jsonschema)."""
    if jsonschema is None:
        return
    jsonschema.Draft202012Validator(storage_event_schema()).validate(value)


def test_public_names():
    assert set(calstream.events.__all__) >= {
        "EventSettings",
        "StorageEvent",
        "build_storage_event",
        "Outbox",
        "OutboxEntry",
        "format_entries",
    }
    for name in calstream.events.__all__:
        assert hasattr(calstream.events, name)


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="shared examples not available")
def test_inlined_example_matches_shared_example():
    shared = json.loads((EXAMPLES / "dcache-billing-transfer-write.json").read_text())
    assert set(shared) == set(WRITE_EXAMPLE)
    for key, value in shared.items():
        assert type(WRITE_EXAMPLE[key]) is type(value), key
    assert set(shared["protocolInfo"]) == set(WRITE_EXAMPLE["protocolInfo"])


def test_value_has_the_billing_write_fields_and_types(event):
    value = event.value
    assert set(value) == set(WRITE_EXAMPLE) | {"calstream"}
    for key, example in WRITE_EXAMPLE.items():
        if key == "pnfsid":  # null unless the destination tells us
            assert value[key] is None
            continue
        assert type(value[key]) is type(example), key
    for nested in ("status", "protocolInfo"):
        assert set(value[nested]) == set(WRITE_EXAMPLE[nested])
        for key, example in WRITE_EXAMPLE[nested].items():
            assert type(value[nested][key]) is type(example), f"{nested}.{key}"


def test_value_contents(event):
    value = event.value
    assert value["version"] == "1.0"
    assert value["msgType"] == "transfer"
    assert value["isWrite"] == "write"
    assert value["isP2p"] is False
    assert value["status"] == {"code": 0, "msg": ""}
    assert value["billingPath"] == value["transferPath"] == make_stored().path
    assert value["fileSize"] == value["transferSize"] == 268435456
    assert value["transferTime"] == 2150
    assert value["writeActive"] == "PT2.15S"
    assert value["meanWriteBandwidth"] == pytest.approx(268435456 / 2.15)
    assert value["protocolInfo"]["protocol"] == "file"
    assert value["localEndpoint"] == ""
    cal = value["calstream"]
    assert cal["event_id"] == event.id
    assert cal["checksum"] == {"adler32": "1a2b3c4d"}
    assert cal["destination"] == make_stored().url
    assert (cal["run"], cal["proposal"], cal["sequence"]) == (42, 900001, 3)
    assert (cal["detector"], cal["module"]) == ("jungfrau", 1)
    assert cal["sources"] == ["SPB_IRDA_JF4M/CORR/JNGFR01:output"]
    assert (cal["first_train"], cal["last_train"], cal["trains"], cal["frames"]) == (
        10000,
        10099,
        100,
        1600,
    )
    assert cal["compression"]["adc"] == "bitshuffle-lz4"
    assert cal["constants"]["file"] == "/constants/jf.h5"


def test_date_is_iso8601_with_offset_like_dcache():
    now = datetime(2026, 7, 1, 12, 0, 5, 123000, tzinfo=timezone(timedelta(hours=2)))
    event = build_storage_event(make_stored(), make_info(), EventSettings(), now=now)
    assert event.value["date"] == "2026-07-01T12:00:05.123+02:00"
    assert event.value["session"].startswith("calstream:calstream@")
    assert re.fullmatch(r".*:1782900005123-\d+", event.value["session"])
    headers = dict(event.headers)
    assert headers["ce_time"] == b"2026-07-01T10:00:05.123Z"


def test_default_date_has_an_offset(event):
    date = datetime.fromisoformat(event.value["date"])
    assert date.tzinfo is not None
    assert abs(datetime.now(UTC) - date) < timedelta(minutes=1)


@pytest.mark.parametrize(
    ("seconds", "millis", "duration"),
    [
        (0.0, 0, "PT0S"),
        (0.01, 10, "PT0.01S"),
        (2.1, 2100, "PT2.1S"),
        (60.0, 60000, "PT1M"),
        (3723.5, 3723500, "PT1H2M3.5S"),
    ],
)
def test_transfer_time_in_ms_and_java_duration(seconds, millis, duration):
    event = build_storage_event(make_stored(transfer_time_s=seconds), make_info())
    assert event.value["transferTime"] == millis
    assert isinstance(event.value["transferTime"], int)
    assert event.value["writeActive"] == duration
    assert isinstance(event.value["meanWriteBandwidth"], float)
    validate(event.value)


def test_webdav_destination_maps_to_dcache_http_protocol():
    stored = make_stored(
        url="https://dcache.example:2880/pnfs/xfel/r0042/f.h5",
        path="/pnfs/xfel/r0042/f.h5",
        protocol="https",
        host="dcache.example",
        port=2880,
    )
    settings = EventSettings(host="calnode1", subject=["UserNamePrincipal[calib]"])
    value = build_storage_event(stored, make_info(), settings).value
    assert value["protocolInfo"] == {
        "protocol": "Http",
        "versionMajor": 1,
        "versionMinor": 1,
        "transferTag": "",
        "port": 0,
        "host": "calnode1",
    }
    assert value["localEndpoint"] == "dcache.example:2880"
    assert value["subject"] == ["UserNamePrincipal[calib]"]
    validate(value)


@needs_jsonschema
def test_schema_is_package_data_and_valid():
    resource = resources.files("calstream.events").joinpath("storage-event.schema.json")
    assert resource.is_file()
    schema = storage_event_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


@needs_jsonschema
def test_schema_validates_event(event):
    validate(event.value)
    validate(json.loads(event.value_bytes()))


@needs_jsonschema
def test_schema_accepts_a_dcache_record_with_our_object(event):
    # a consumer of dCache's own records and of ours sees the same shape
    value = copy.deepcopy(WRITE_EXAMPLE) | {"calstream": event.value["calstream"]}
    validate(value)


def _set(path: str, new):
    def change(value):
        *parents, last = path.split(".")
        for p in parents:
            value = value[p]
        if new is KeyError:
            del value[last]
        else:
            value[last] = new

    return change


@needs_jsonschema
@pytest.mark.parametrize(
    "change",
    [
        _set("isWrite", "read"),
        _set("msgType", "request"),
        _set("transferTime", 2150.5),
        _set("fileSize", "268435456"),
        _set("date", "2026-07-01 12:00:05"),
        _set("writeActive", "2.1 s"),
        _set("isP2p", True),
        _set("status.code", 1),
        _set("protocolInfo.port", 70000),
        _set("calstream.checksum.adler32", "1A2B3C4D"),
        _set("calstream.run", KeyError),
        _set("calstream.unexpected", 1),
        _set("billingPath", KeyError),
    ],
)
def test_schema_rejects_broken_values(event, change):
    value = copy.deepcopy(event.value)
    change(value)
    with pytest.raises(jsonschema.ValidationError):
        validate(value)


def test_headers_cloudevents_binary_binding(event):
    assert isinstance(event.headers, tuple)
    for name, value in event.headers:
        assert isinstance(name, str)
        assert isinstance(value, bytes)
    headers = dict(event.headers)
    assert set(headers) == CE_HEADERS
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"].decode() == event.id == event.value["calstream"]["event_id"]
    assert headers["ce_source"].decode().startswith("calstream://")
    assert headers["ce_type"] == b"eu.xfel.calstream.file.stored"
    assert headers["ce_subject"].decode() == event.key == event.value["billingPath"]
    assert headers["content-type"] == b"application/json"
    ce_time = headers["ce_time"].decode()
    assert ce_time.endswith("Z")
    assert datetime.fromisoformat(ce_time) == datetime.fromisoformat(event.value["date"])


def test_key_and_value_bytes(event):
    assert event.key == make_stored().path
    assert event.key_bytes() == make_stored().path.encode()
    raw = event.value_bytes()
    assert isinstance(raw, bytes)
    assert json.loads(raw) == event.value
    assert raw == event.value_bytes()  # deterministic
    assert b"\n" not in raw


def test_non_ascii_path_is_utf8():
    stored = make_stored(path="/data/r0042/Grün.h5", url="file:///data/r0042/Gr%C3%BCn.h5")
    event = build_storage_event(stored, make_info())
    assert dict(event.headers)["ce_subject"] == "/data/r0042/Grün.h5".encode()
    assert json.loads(event.value_bytes().decode("utf-8"))["transferPath"] == stored.path


def test_event_ids_are_unique_uuids():
    ids = {build_storage_event(make_stored(), make_info()).id for _ in range(50)}
    assert len(ids) == 50
    for event_id in ids:
        assert re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", event_id
        )
    fixed = build_storage_event(make_stored(), make_info(), event_id="my-id")
    assert fixed.id == "my-id" == dict(fixed.headers)["ce_id"].decode()


def test_constants_provenance_becomes_plain_json():
    constants = {
        "file": Path("/constants/jf.h5"),
        "creation": {"attr": b"2026-01-01", "cells": np.int64(16), "temp": np.float32(1.5)},
        "names": ("Offset10Hz", "RelativeGain10Hz"),
        "shape": np.array([16, 3, 512, 1024]),
        "when": datetime(2026, 1, 1, tzinfo=UTC),
        "bad": float("nan"),
        7: "non-string key",
    }
    event = build_storage_event(make_stored(), make_info(constants=constants))
    out = json.loads(event.value_bytes())["calstream"]["constants"]
    assert out["file"] == "/constants/jf.h5"
    assert out["creation"] == {"attr": "2026-01-01", "cells": 16, "temp": 1.5}
    assert out["names"] == ["Offset10Hz", "RelativeGain10Hz"]
    assert out["shape"] == [16, 3, 512, 1024]
    assert out["when"] == "2026-01-01T00:00:00+00:00"
    assert out["bad"] == "nan"
    assert out["7"] == "non-string key"
    validate(event.value)


def test_uppercase_adler32_is_normalised():
    event = build_storage_event(make_stored(adler32="0A0B0C0D"), make_info())
    assert event.value["calstream"]["checksum"]["adler32"] == "0a0b0c0d"


@pytest.mark.parametrize(
    "changes",
    [
        {"adler32": "xyz"},
        {"adler32": "123456789"},
        {"size": -1},
        {"transfer_time_s": float("nan")},
        {"transfer_time_s": -1.0},
        {"path": ""},
    ],
)
def test_invalid_stored_record_raises_event_error(changes):
    with pytest.raises(EventError) as info:
        build_storage_event(make_stored(**changes), make_info())
    assert info.value.retriable is False


def test_settings_defaults_and_validation():
    settings = EventSettings()
    assert settings.cell_name == settings.cell_type == "calstream"
    assert settings.cell_domain
    assert settings.ce_source.startswith("calstream://")
    assert EventSettings(subject=["a", "b"]).subject == ("a", "b")
    with pytest.raises(ConfigError, match="subject"):
        EventSettings(subject="UserNamePrincipal[calib]")
    with pytest.raises(ConfigError, match="cell_name"):
        EventSettings(cell_name="")
    custom = EventSettings(
        cell_name="calnode1",
        cell_type="calstream",
        cell_domain="spb",
        storage_info="xfel:corr@osm",
        initiator="run:42",
        ce_source="calstream://spb/calnode1",
    )
    event = build_storage_event(make_stored(), make_info(), custom)
    assert event.value["cellName"] == "calnode1"
    assert event.value["cellDomain"] == "spb"
    assert event.value["storageInfo"] == "xfel:corr@osm"
    assert event.value["initiator"] == "run:42"
    assert dict(event.headers)["ce_source"] == b"calstream://spb/calnode1"


def test_billing_consumers_accept_the_event(event):
    value = json.loads(event.value_bytes())
    # DESY's OpenWhisk tutorial filter
    assert value["msgType"] != "request" and value["isWrite"] == "write"
    # FNAL's consumer branches on msgType and isWrite
    assert (value["msgType"], value["isWrite"]) == ("transfer", "write")
