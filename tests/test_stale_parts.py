"""Hidden partial uploads (``.NAME.part-XXXXXXXX``) are removed: after a failed attempt where the
door can still be reached, and at start-up for the names this pipeline writes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from calstream.errors import StoreError
from calstream.pipeline import Pipeline
from calstream.store import open_destination

from .test_webdav import RELPATH, fast, spool_file
from .webdav_fixtures import WebdavServer

OURS = [
    ".CORR-R0001-JNGFR01-S00000.h5.part-0123abcd",
    ".CORR-R0001-JNGFR01-S00007.h5.part-ffff0000",
]
THEIRS = [
    ".CORR-R0001-JNGFRB01-S00000.h5.part-0123abcd",  # another process (its own aggregator)
    ".CORR-R0001-JNGFR02-S00000.h5.part-0123abcd",  # a module we do not write
    ".CORR-R0001-JNGFR01-S00000.h5.part-xyz",  # not one of our temporary names
    "CORR-R0001-JNGFR01-S00009.h5",  # a real file
]


def plant(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in OURS + THEIRS:
        (folder / name).write_bytes(b"partial")


@pytest.mark.parametrize("kind", ["webdav", "file"])
def test_start_up_removes_our_stale_parts_only(kind, make_config, constants_1cell, webdav,
                                               token_file, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    if kind == "webdav":
        folder = webdav.root / "r0001"
        more = {"output__destination": webdav.url, "output__token_file": str(token_file)}
    else:
        folder = tmp_path / "data" / "r0001"
        more = {}
    plant(folder)
    config = make_config(constants_1cell, simulate__enabled=True, simulate__trains=1, **more)
    summary = Pipeline(config).run()
    assert summary.files == 1 and summary.unstored_files == 0
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([*THEIRS, "CORR-R0001-JNGFR01-S00000.h5"])
    assert any("removed 2 partial upload(s)" in r.getMessage() for r in caplog.records)


def test_door_down_at_start_is_only_a_warning(make_config, constants_1cell, webdav_down,
                                              token_file, caplog):
    caplog.set_level(logging.WARNING)
    config = make_config(constants_1cell, simulate__enabled=True, simulate__trains=1,
                         output__destination=webdav_down.url, output__token_file=str(token_file),
                         output__store_deadline=0.2, output__retry_unstored=0.0)
    assert Pipeline(config).run().unstored_files == 1
    assert any("cannot look for stale partial uploads" in r.getMessage()
               for r in caplog.records)
    assert not any("cannot delete" in r.getMessage() for r in caplog.records)  # nothing sent


def test_failed_put_deletes_its_temporary(webdav: WebdavServer, token_file, tmp_path):
    """A PUT the door answered with an error: the hidden name is deleted before the retry."""
    src = spool_file(tmp_path)
    dest = open_destination(webdav.url, fast(token_file, deadline=0.4))
    webdav.faults.fail("PUT", 500, 500, 500, 500, 500, 500, 500, 500)
    with pytest.raises(StoreError):
        dest.store(src, RELPATH)
    assert webdav.faults.requests["DELETE"] == webdav.faults.requests["PUT"] >= 2
    assert webdav.files() == {}


def test_put_that_timed_out_leaves_nothing_after_the_next_start(
    make_config, constants_1cell, webdav, token_file, tmp_path
):
    """The door finishes a PUT we gave up on: the next start removes what it left."""
    webdav.faults.delay = 0.8
    config = make_config(constants_1cell, simulate__enabled=True, simulate__trains=1,
                         output__destination=webdav.url, output__token_file=str(token_file),
                         output__store_timeout=0.3, output__store_deadline=0.5,
                         output__retry_unstored=0.0)
    assert Pipeline(config).run().unstored_files == 1
    time.sleep(1.0)  # the door's handler wakes up and writes the hidden file
    hidden = [k for k in webdav.files() if "/." in k]
    webdav.faults.delay = 0.0
    summary = Pipeline(config).run(max_trains=0)
    assert summary.files == 1 and summary.unstored_files == 0
    assert sorted(webdav.files()) == [RELPATH]
    assert hidden  # (what the door left: the case this start-up step is for)
