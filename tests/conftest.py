"""Shared fixtures: free ports, synthetic constants, small pipeline configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from calstream.calibrate import synth_jungfrau_constants
from calstream.config import load_config
from tests.ports import free_port

pytest_plugins = [
    "tests.kafka_fixtures",  # the tansu broker (or CALSTREAM_TEST_KAFKA)
    "tests.webdav_fixtures",  # a wsgidav door with dCache's Digest header
]



@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def constants_1cell(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic one-cell JUNGFRAU constants in the facility layout (small: fast tests)."""
    path = tmp_path_factory.mktemp("constants") / "jungfrau-1cell.h5"
    return synth_jungfrau_constants(path, cells=1, seed=1)


@pytest.fixture(scope="session")
def constants_16cell(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("constants") / "jungfrau-16cell.h5"
    return synth_jungfrau_constants(path, cells=16, seed=1)


@pytest.fixture
def make_config(tmp_path: Path, port: int):
    """Build a validated Config writing below tmp_path; keyword args are --set overrides."""

    def make(constants: Path, *, cells: int = 1, **overrides: object):
        sets: dict[str, object] = {
            "source.endpoint": f"tcp://127.0.0.1:{port}",
            "calibration.constants": str(constants),
            "calibration.cells": cells,
            "calibration.synthesize_missing": False,
            "output.spool": str(tmp_path / "spool"),
            "output.destination": f"file://{tmp_path / 'data'}",
            "simulate.enabled": False,
            "pipeline.log_every": 1.0,
        }
        for key, value in overrides.items():
            sets[key.replace("__", ".")] = value
        return load_config(None, [f"{k}={_toml(v)}" for k, v in sets.items()])

    return make


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
