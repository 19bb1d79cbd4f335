"""Config: TOML → typed objects; every error names file, key and reason."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from calstream.config import Config, load_config
from calstream.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_demo_toml_spells_out_the_embedded_defaults():
    from_file = load_config(REPO / "configs" / "demo.toml")
    embedded = load_config(None)
    assert from_file.to_dict() == embedded.to_dict()
    assert from_file.path.endswith("demo.toml")


def test_overrides_are_typed():
    config = load_config(None, ["output.run=7", "source.modules=[1, 2]", "source.endpoint=tcp://h:1"])
    assert config.output.run == 7
    assert config.source.modules == (1, 2)
    assert config.source.endpoint == "tcp://h:1"  # not TOML: taken as text
    assert config.source.source_name(2) == "SPB_IRDA_JF4M/DET/JNGFR02:daqOutput"
    assert config.output_source(2) == "SPB_IRDA_JF4M/CORR/JNGFR02:output"


def test_config_is_frozen():
    config = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.output.run = 3  # type: ignore[misc]
    assert isinstance(config, Config)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[output]\nrun = 'one'\n", "output.run", "must be an integer"),
        ("[output]\ntrainsperfile = 3\n", "output.trainsperfile", "unknown key"),
        ("[source]\npattern = 'dealer'\n", "source.pattern", "must be one of"),
        ("[source]\nmodules = []\n", "source.modules", "at least one module"),
        ("[source]\nendpoint = 'localhost:80'\n", "source.endpoint", "ZeroMQ endpoint"),
        ("[calibration]\ncells = 4\n", "calibration.cells", "1 or 16"),
        ("[pipeline]\nworkers = 0\n", "pipeline.workers", ">= 1"),
        ("[outptu]\nrun = 1\n", "outptu", "unknown section"),
        ("[output]\ncompression = { pixels = 'none' }\n", "output.compression", "adc, gain"),
        ("[output]\nrun = 10000\n", "output.run", "from 0 to 9999"),
        ("[output]\nproposal = 5000000000\n", "output.proposal", "from 0 to 4294967295"),
        ("[source]\ndetector_id = 'SPB.JF'\n", "source.detector_id", "corrected source name"),
        ("[output]\ndetector_id = '../x'\n", "output.detector_id", "corrected source name"),
        ("[pipeline]\noverflow = 'drop'\n", "pipeline.overflow", "'drop-oldest'"),
        ("[pipeline]\nassembly_timeout = 0\n", "pipeline.assembly_timeout", "> 0"),
        ("[source]\nendpoints = ['tcp://a:1', 'a:2']\n", "source.endpoints[1]", "ZeroMQ"),
        ("[source]\nendpoints = ['tcp://a:1', 'tcp://a:1']\n", "source.endpoints",
         "duplicates"),
        ("[output]\naggregator = '../JF'\n", "output.aggregator", "a letter then"),
        ("[metrics]\nport = 70000\n", "metrics.port", "0 (off) to 65535"),
        ("[metrics]\nstatus = 'fancy'\n", "metrics.status", "must be one of"),
        ("[preview]\nendpoint = 'localhost'\n", "preview.endpoint", "ZeroMQ endpoint"),
        ("[preview]\nevery = 0\n", "preview.every", ">= 1"),
    ],
)
def test_errors_name_file_key_and_reason(tmp_path, text, key, reason):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert reason in message


def test_not_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[output\nrun = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_bad_override():
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(None, ["run=3"])


def test_store_keys() -> None:
    config = load_config(None, [
        'output.destination="davs://door.example:2880/pnfs/xfel"',
        'output.token_file="/run/token"', "output.uploads=4", 'output.bytes_per_file="1.5GiB"',
        'output.spool_limit="200GB"', 'output.overflow="stop"', "output.bitround=12",
        'output.compression={adc="zstd:3", gain="lz4", mask="blosc:zstd:5"}',
        "output.store_deadline=30",
    ])
    out = config.output
    assert out.max_file_bytes == int(1.5 * 2**30) and out.spool_limit_bytes == 200 * 10**9
    settings = out.webdav_settings()
    assert settings.token_file == "/run/token" and settings.deadline == 30.0
    assert settings.verify_tls
    assert load_config().output.max_file_bytes is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('output.compression={adc="zstd:40"}', r"output\.compression\.adc: zstd level"),
        ('output.compression={adc="gzip"}', r"output\.compression\.adc: unknown codec 'gzip'"),
        ('output.spool_limit="lots"', r"output\.spool_limit: must be a size"),
        ("output.bitround=24", r"output\.bitround: keeps 1 to 23"),
        ("output.uploads=0", r"output\.uploads: must be >= 1"),
        ('output.overflow="drop"', r"output\.overflow: must be one of 'block', 'stop'"),
        ('output.retention="forever"', r"output\.retention: must be one of"),
        ('output.token_file="t"', r"output\.token_file: is for davs://"),
    ],
)
def test_store_key_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
