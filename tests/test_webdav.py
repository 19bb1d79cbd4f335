"""The WebDAV destination against a real wsgidav server that behaves like a dCache door."""

from __future__ import annotations

import logging
import os
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

from calstream.errors import ConfigError, StoreError
from calstream.store import WebdavDestination, WebdavSettings, open_destination

from .webdav_fixtures import TOKEN, WebdavServer

RELPATH = "r0001/CORR-R0001-JNGFR01-S00000.h5"


def spool_file(tmp_path: Path, size: int = 300_000, seed: int = 0) -> Path:
    path = tmp_path / "spool" / "complete" / "CORR-R0001-JNGFR01-S00000.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(seed.to_bytes(4, "little") + os.urandom(size - 4))
    return path


def adler(data: bytes) -> str:
    return f"{zlib.adler32(data):08x}"


def fast(token_file: Path, **kwargs: float | bool) -> WebdavSettings:
    """Settings with short waits so retries take milliseconds in tests."""
    values: dict = {"timeout": 5.0, "deadline": 5.0, "backoff": 0.05, "backoff_max": 0.2,
                    **kwargs}
    return WebdavSettings(token_file=str(token_file), **values)


@pytest.mark.parametrize("rename", [True, False], ids=["put-then-move", "put"])
def test_put_streams_with_token_and_digest(webdav: WebdavServer, token_file, tmp_path, caplog,
                                           rename: bool):
    caplog.set_level(logging.DEBUG)
    src = spool_file(tmp_path)
    dest = open_destination(webdav.url, fast(token_file, rename=rename))
    assert isinstance(dest, WebdavDestination)
    stored = dest.store(src, RELPATH)
    data = src.read_bytes()
    assert webdav.files() == {RELPATH: data}  # the collection r0001 was created (MKCOL)
    assert stored.adler32 == adler(data) and stored.size == len(data)
    assert stored.url == f"{webdav.url}/{RELPATH}"
    assert stored.path == f"/pnfs/{RELPATH}"
    assert (stored.protocol, stored.host, stored.port) == ("http", "127.0.0.1", webdav.port)
    assert set(webdav.faults.authorization) == {f"Bearer {TOKEN}"}
    assert webdav.faults.requests["PUT"] == 1
    assert webdav.faults.requests["MOVE"] == (1 if rename else 0)
    assert TOKEN not in caplog.text


def test_missing_root_and_parents_are_created(webdav: WebdavServer, token_file, tmp_path):
    src = spool_file(tmp_path)
    dest = open_destination(f"{webdav.url}/new/root", fast(token_file))
    dest.store(src, "r0001/a/b.h5")
    dest.store(src, "r0001/a/c.h5")
    assert sorted(webdav.files()) == ["new/root/r0001/a/b.h5", "new/root/r0001/a/c.h5"]
    # a, r0001 and root answer 409 (parent missing), then new, root, r0001, a are created;
    # the second file needs none
    assert webdav.faults.requests["MKCOL"] == 3 + 4


def test_put_never_holds_the_whole_file(webdav: WebdavServer, token_file, tmp_path):
    src = spool_file(tmp_path, size=24 << 20)
    dest = open_destination(webdav.url, fast(token_file))
    tracemalloc.start()
    try:
        dest.store(src, RELPATH)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 1e6:.1f} MB for a 25 MB file"
    assert webdav.files()[RELPATH] == src.read_bytes()


@pytest.mark.parametrize("rename", [True, False], ids=["put-then-move", "put"])
def test_identical_file_there_counts_as_stored(webdav: WebdavServer, token_file, tmp_path,
                                               rename: bool):
    src = spool_file(tmp_path)
    dest = open_destination(webdav.url, fast(token_file, rename=rename))
    first = dest.store(src, RELPATH)
    again = dest.store(src, RELPATH)  # e.g. after a crash before the spool forgot it
    assert again.adler32 == first.adler32
    assert webdav.faults.requests["HEAD"] == 1  # compared, not overwritten

    other = spool_file(tmp_path / "other", seed=1)
    with pytest.raises(StoreError, match="a different file is already stored") as info:
        dest.store(other, RELPATH)
    assert not info.value.retriable
    assert webdav.files() == {RELPATH: src.read_bytes()}  # never overwritten, nothing left


def test_wrong_token_is_refused_not_retried(webdav: WebdavServer, tmp_path, caplog):
    bad = tmp_path / "bad-token"
    bad.write_text("not-the-token")
    src = spool_file(tmp_path)
    dest = open_destination(webdav.url, fast(bad))
    with pytest.raises(StoreError, match="401") as info:
        dest.store(src, RELPATH)
    assert str(bad) in str(info.value) and "not-the-token" not in str(info.value)
    assert not info.value.retriable
    assert webdav.files() == {}
    # the token renewer writes a new token: the next upload uses it
    time.sleep(0.01)
    bad.write_text(TOKEN)
    os.utime(bad, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert dest.store(src, RELPATH).size == src.stat().st_size
    assert "not-the-token" not in caplog.text and TOKEN not in caplog.text


def test_503_then_success(webdav: WebdavServer, token_file, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    webdav.faults.fail("PUT", 503, 502)
    src = spool_file(tmp_path)
    stored = open_destination(webdav.url, fast(token_file)).store(src, RELPATH)
    assert webdav.faults.requests["PUT"] == 3
    assert stored.adler32 == adler(src.read_bytes())
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2 and "HTTP 503" in retries[0] and "(attempt 1)" in retries[0]


def test_server_down_at_start(webdav_down: WebdavServer, token_file, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    src = spool_file(tmp_path)
    dest = open_destination(webdav_down.url, fast(token_file, deadline=10.0))
    webdav_down.start_after(0.4)
    stored = dest.store(src, RELPATH)
    assert webdav_down.files() == {RELPATH: src.read_bytes()}
    assert stored.size == src.stat().st_size
    assert any("MKCOL" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)


def test_server_down_past_deadline_gives_up(webdav_down: WebdavServer, token_file, tmp_path):
    src = spool_file(tmp_path)
    dest = open_destination(webdav_down.url, fast(token_file, deadline=0.5))
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"gave up uploading .* after [0-9]+ attempts") as info:
        dest.store(src, RELPATH)
    assert time.monotonic() - t0 < 3
    assert webdav_down.url in str(info.value)
    assert src.exists()


@pytest.mark.parametrize("rename", [True, False], ids=["put-then-move", "put"])
def test_corrupted_upload_is_deleted_and_retried(webdav: WebdavServer, token_file, tmp_path,
                                                 caplog, rename: bool):
    caplog.set_level(logging.WARNING)
    webdav.faults.wrong_digest = 1
    src = spool_file(tmp_path)
    stored = open_destination(webdav.url, fast(token_file, rename=rename)).store(src, RELPATH)
    assert webdav.faults.requests["PUT"] == 2 and webdav.faults.requests["DELETE"] == 1
    assert stored.adler32 == adler(src.read_bytes())
    assert webdav.files() == {RELPATH: src.read_bytes()}
    assert any("reports adler32" in r.getMessage() for r in caplog.records)


def test_always_corrupted_is_never_reported_stored(webdav: WebdavServer, token_file, tmp_path):
    webdav.faults.wrong_digest = 1000
    src = spool_file(tmp_path)
    dest = open_destination(webdav.url, fast(token_file, deadline=0.6))
    with pytest.raises(StoreError, match=r"gave up .*reports adler32"):
        dest.store(src, RELPATH)
    assert webdav.files() == {}  # each bad copy was deleted
    assert src.exists()


def test_slow_server_past_deadline(webdav: WebdavServer, token_file, tmp_path):
    webdav.faults.delay = 1.0
    src = spool_file(tmp_path, size=3_000_000)
    dest = open_destination(webdav.url, fast(token_file, timeout=0.3, deadline=0.5))
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="timed out"):
        dest.store(src, RELPATH)
    assert time.monotonic() - t0 < 1.0
    assert src.exists()
    time.sleep(1.0)  # the server writes what it got of the broken upload...
    assert RELPATH not in webdav.files()  # ...under the hidden name only


def test_token_file_gone_while_running_is_retried(webdav: WebdavServer, token_file, tmp_path,
                                                  caplog):
    caplog.set_level(logging.WARNING)
    dest = open_destination(webdav.url, fast(token_file, deadline=10.0))
    moved = token_file.with_name("renewing")
    token_file.rename(moved)
    timer = __import__("threading").Timer(0.3, moved.rename, (token_file,))
    timer.start()
    src = spool_file(tmp_path)
    assert dest.store(src, RELPATH).size == src.stat().st_size
    timer.join()
    assert any("cannot read token file" in r.getMessage() for r in caplog.records)


def test_conflict_without_a_file_does_not_spin(webdav: WebdavServer, token_file, tmp_path):
    webdav.faults.fail("PUT", *[409] * 100)
    dest = open_destination(webdav.url, fast(token_file, deadline=0.5, rename=False))
    with pytest.raises(StoreError, match="409 Conflict, and nothing is there"):
        dest.store(spool_file(tmp_path), RELPATH)
    assert webdav.faults.requests["PUT"] < 15


def test_refuses_paths_that_leave_the_root(webdav: WebdavServer, token_file, tmp_path):
    dest = open_destination(webdav.url, fast(token_file))
    for bad in ("../x.h5", "/abs.h5", "r0001/.hidden.h5", "a//b.h5", "a/%2e%2e/b.h5", ""):
        with pytest.raises(StoreError, match="not allowed"):
            dest.store(spool_file(tmp_path), bad)


def test_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="CA bundle"):
        WebdavDestination("davs://door:2880/pnfs", WebdavSettings(ca_bundle=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match=r"token file .* not found"):
        WebdavDestination("davs://door:2880/pnfs", WebdavSettings(token_file=str(tmp_path / "t")))
    dest = WebdavDestination("davs://door.example:2880/pnfs/xfel/")
    assert dest.url == "https://door.example:2880/pnfs/xfel" and dest.port == 2880
    assert dest.settings.verify_tls


def test_server_without_digests(webdav: WebdavServer, token_file, tmp_path):
    """Without Digest headers the size is checked after PUT, the content read back on 412."""
    webdav.faults.no_digest = True
    src = spool_file(tmp_path)
    dest = open_destination(webdav.url, fast(token_file))
    assert dest.store(src, RELPATH).adler32 == adler(src.read_bytes())
    assert webdav.faults.requests["HEAD"] == 1
    assert dest.store(src, RELPATH).adler32 == adler(src.read_bytes())  # GET compares
    assert webdav.faults.requests["GET"] == 1
    other = tmp_path / "other.h5"
    other.write_bytes(bytes(src.stat().st_size))  # same size, other content
    with pytest.raises(StoreError, match=r"adler32 .* there"):
        dest.store(other, RELPATH)


def test_several_uploads_at_once(webdav: WebdavServer, token_file, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    dest = open_destination(webdav.url, fast(token_file))
    files = []
    for i in range(6):
        path = tmp_path / f"f{i}.h5"
        path.write_bytes(os.urandom(200_000))
        files.append(path)
    with ThreadPoolExecutor(3) as pool:
        stored = list(pool.map(lambda p: dest.store(p, f"r0002/{p.name}"), files))
    assert {s.adler32 for s in stored} == {adler(p.read_bytes()) for p in files}
    assert len(webdav.files()) == 6
    dest.close()
    dest.close()


def test_tls_door_verified_with_ca_bundle(tmp_path, token_file):
    import trustme

    ca = trustme.CA()
    server = WebdavServer(tmp_path / "door", tls=ca).start()
    try:
        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        src = spool_file(tmp_path)
        url = server.url.replace("https://", "davs://")
        stored = open_destination(url, fast(token_file, ca_bundle=str(bundle))).store(src, RELPATH)
        assert stored.protocol == "https" and stored.url.startswith("https://127.0.0.1")
        assert server.files() == {RELPATH: src.read_bytes()}

        # the system's CAs do not know the door: refused at once, not retried to the deadline
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=r"not trusted.*ca_bundle") as info:
            open_destination(url, fast(token_file, deadline=30.0)).store(src, "r0001/x.h5")
        assert not info.value.retriable and time.monotonic() - t0 < 5
        insecure = open_destination(url, fast(token_file, verify_tls=False))
        assert insecure.store(src, "r0001/y.h5").size == src.stat().st_size
    finally:
        server.stop()
