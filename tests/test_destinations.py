"""File destination: atomic, idempotent, checksummed, and nothing escapes the root."""

from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path

import pytest

from calstream.errors import ConfigError, StoreError
from calstream.store import (
    Adler32,
    Destination,
    FileDestination,
    adler32_file,
    open_destination,
)

RELPATH = "r0001/CORR-R0001-JNGFR01-S00000.h5"


@pytest.fixture(scope="module")
def payload() -> bytes:
    """Deterministic test data, a bit over 3 MiB (blocks: see the small blocksize below)."""
    size = 3 * 1024 * 1024 + 17
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def spool_file(directory: Path, data: bytes, name: str = "CORR-R0001-JNGFR01-S00000.h5") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def hidden_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*")]


# --- checksum ---------------------------------------------------------------------------


def test_adler32_matches_zlib(tmp_path: Path, payload: bytes) -> None:
    path = spool_file(tmp_path, payload)
    expected = f"{zlib.adler32(payload):08x}"
    assert adler32_file(path) == expected
    assert adler32_file(path, blocksize=4093) == expected
    running = Adler32()
    for i in range(0, len(payload), 100_000):
        running.update(memoryview(payload)[i : i + 100_000])
    assert running.hexdigest() == expected
    assert running.nbytes == len(payload)
    assert Adler32().hexdigest() == "00000001"
    assert Adler32(b"\0").hexdigest() == "00010001"  # leading zeros kept
    with pytest.raises(StoreError, match="missing"):
        adler32_file(tmp_path / "missing")


# --- URLs -------------------------------------------------------------------------------


def test_open_destination_file_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = open_destination(f"file://{tmp_path}/data")
    assert isinstance(dest, FileDestination)
    assert isinstance(dest, Destination)
    assert dest.root == tmp_path / "data"
    assert dest.url == f"file://{tmp_path}/data"
    assert (tmp_path / "data").is_dir()
    monkeypatch.chdir(tmp_path)
    assert open_destination("file://./rel").root == tmp_path / "rel"
    assert open_destination("file://localhost/" + str(tmp_path / "x")[1:]).root == tmp_path / "x"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://dcache.example.org/pnfs/data", "plain http is only allowed to a loopback"),
        ("davs://user:pw@dcache.example.org/pnfs", "must not carry credentials"),
        ("davs:///pnfs/data", "not a WebDAV URL"),
        ("s3://bucket/data", "unknown destination scheme 's3'"),
        ("/plain/path", "no scheme"),
        ("file://", "no path"),
    ],
)
def test_open_destination_refuses(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_destination(url)


# --- storing ----------------------------------------------------------------------------


@pytest.mark.parametrize("link", [True, False], ids=["same-fs-link", "copy"])
def test_store(tmp_path: Path, payload: bytes, link: bool) -> None:
    src = spool_file(tmp_path / "spool", payload)
    dest = FileDestination(tmp_path / "dest", link=link)
    stored = dest.store(src, RELPATH)
    target = tmp_path / "dest" / RELPATH
    assert target.read_bytes() == payload
    assert stored.path == str(target)
    assert stored.url == f"file://{target}"
    assert stored.size == len(payload)
    assert stored.adler32 == f"{zlib.adler32(payload):08x}"
    assert stored.protocol == "file"
    assert stored.transfer_time_s >= 0
    assert src.exists()  # the spool keeps its file until it is removed from the spool
    assert os.path.samefile(src, target) is link
    assert hidden_files(tmp_path / "dest") == []


def test_store_across_filesystems_copies(tmp_path: Path, payload: bytes) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem")
    spool = shm / f"calstream-test-{os.getpid()}"
    try:
        src = spool_file(spool, payload)
        stored = FileDestination(tmp_path / "dest").store(src, RELPATH)
        target = Path(stored.path)
        assert target.read_bytes() == payload
        assert not os.path.samefile(src, target)
        assert stored.adler32 == f"{zlib.adler32(payload):08x}"
    finally:
        for p in spool.glob("*"):
            p.unlink()
        spool.rmdir()


@pytest.mark.parametrize("link", [True, False], ids=["same-fs-link", "copy"])
def test_store_is_idempotent(tmp_path: Path, payload: bytes, link: bool) -> None:
    dest = FileDestination(tmp_path / "dest", link=link)
    first = dest.store(spool_file(tmp_path / "spool", payload), RELPATH)
    # the same file again, and an identical copy of it from elsewhere
    again = dest.store(tmp_path / "spool" / Path(RELPATH).name, RELPATH)
    copy = dest.store(spool_file(tmp_path / "other", payload), RELPATH)
    for result in (again, copy):
        assert (result.path, result.size, result.adler32) == (
            first.path,
            first.size,
            first.adler32,
        )
    assert hidden_files(tmp_path / "dest") == []


@pytest.mark.parametrize("link", [True, False], ids=["same-fs-link", "copy"])
def test_a_different_file_with_the_same_name_is_a_conflict(
    tmp_path: Path, payload: bytes, link: bool
) -> None:
    dest = FileDestination(tmp_path / "dest", link=link)
    dest.store(spool_file(tmp_path / "a", payload), RELPATH)
    same_size = bytearray(payload)
    same_size[1000] ^= 0xFF
    with pytest.raises(StoreError, match=r"different file is already stored.*adler32"):
        dest.store(spool_file(tmp_path / "b", bytes(same_size)), RELPATH)
    with pytest.raises(StoreError, match=r"different file is already stored.*bytes"):
        dest.store(spool_file(tmp_path / "c", payload[:-1]), RELPATH)
    assert (tmp_path / "dest" / RELPATH).read_bytes() == payload


@pytest.mark.parametrize(
    "relpath",
    [
        "../escape.h5",
        "r0001/../../escape.h5",
        "/tmp/escape.h5",
        "r0001/./x.h5",
        "r0001//x.h5",
        "",
        "r0001/",
        "r0001/.hidden.h5",
        "r0001\\..\\..\\x.h5",
        "r0001/x\0.h5",
    ],
)
def test_relpaths_must_stay_below_the_root(tmp_path: Path, relpath: str) -> None:
    src = spool_file(tmp_path / "spool", b"data")
    with pytest.raises(StoreError, match="not allowed"):
        FileDestination(tmp_path / "a" / "dest").store(src, relpath)
    assert not (tmp_path / "a" / "escape.h5").exists()
    assert not (tmp_path / "escape.h5").exists()


def test_symlinks_below_the_root_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "dest"
    dest = FileDestination(root)
    (root / "r0001").symlink_to(outside, target_is_directory=True)
    src = spool_file(tmp_path / "spool", b"data")
    with pytest.raises(StoreError, match="symlink"):
        dest.store(src, "r0001/x.h5")
    with pytest.raises(StoreError, match="symlink"):
        dest.store(src, "r0001/sub/x.h5")
    assert list(outside.iterdir()) == []
    (root / "r0002").mkdir()
    (root / "r0002" / "x.h5").symlink_to(outside / "x.h5")
    with pytest.raises(StoreError, match="not a regular file"):
        dest.store(src, "r0002/x.h5")
    assert list(outside.iterdir()) == []


def test_os_errors_become_store_errors_naming_the_path(tmp_path: Path) -> None:
    dest = FileDestination(tmp_path / "dest")
    missing = tmp_path / "spool" / "missing.h5"
    with pytest.raises(StoreError, match=r"missing\.h5") as info:
        dest.store(missing, RELPATH)
    assert info.value.retriable
    if os.geteuid() != 0:
        (tmp_path / "dest" / "r0009").mkdir(mode=0o500)
        with pytest.raises(StoreError, match="r0009"):
            dest.store(spool_file(tmp_path / "spool", b"x"), "r0009/x.h5")


def test_no_partial_file_is_ever_visible(tmp_path: Path) -> None:
    """While a big file is copied, the final name shows either nothing or the whole file."""
    size = 48 * 1024 * 1024
    src = tmp_path / "spool" / "big.h5"
    src.parent.mkdir()
    with open(src, "wb") as f:
        f.truncate(size)
    dest = FileDestination(tmp_path / "dest", link=False)
    target = tmp_path / "dest" / "r0001" / "big.h5"
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                seen.add(target.stat().st_size)
            except FileNotFoundError:
                seen.add(-1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        dest.store(src, "r0001/big.h5")
    finally:
        done.set()
        watcher.join()
    assert seen <= {-1, size}
    assert target.stat().st_size == size
