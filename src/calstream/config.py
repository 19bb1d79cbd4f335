"""Pipeline configuration: one TOML file, validated at start-up into frozen, typed objects.

Every problem is a :class:`~calstream.errors.ConfigError` that names the file, the dotted key and
what is wrong, raised before any socket opens or file is written. The defaults below are the
embedded demo (``configs/demo.toml`` spells them out), so ``calstream run`` with no file runs the
demo.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

__all__ = [
    "CalibrationConfig",
    "Config",
    "EventsConfig",
    "MetricsConfig",
    "OutputConfig",
    "PipelineConfig",
    "PreviewConfig",
    "SimulateConfig",
    "SourceConfig",
    "load_config",
]

EMBEDDED = "<embedded defaults>"


@dataclass(frozen=True)
class PipelineConfig:
    """Threads and queues."""

    name: str = "demo"
    workers: int = 2
    queue_size: int = 4
    log_every: float = 5.0
    overflow: Literal["block", "drop-oldest", "drop-newest"] = "block"
    assembly_timeout: float = 1.0
    max_train_jump: int = 1_000_000
    drain_timeout: float = 60.0

    def check(self) -> None:
        _require(self.workers >= 1, "workers", f"must be >= 1. Got {self.workers} instead.")
        _require(self.queue_size >= 1, "queue_size", f"must be >= 1. Got {self.queue_size}.")
        _require(self.assembly_timeout > 0, "assembly_timeout",
                 f"must be > 0 seconds. Got {self.assembly_timeout}.")
        _require(self.max_train_jump >= 0, "max_train_jump",
                 f"must be >= 0 (0: any jump is accepted). Got {self.max_train_jump}.")
        _require(self.drain_timeout > 0, "drain_timeout",
                 f"must be > 0 seconds. Got {self.drain_timeout}.")


@dataclass(frozen=True)
class SourceConfig:
    """Where the raw detector stream comes from and what it contains."""

    endpoint: str = "tcp://127.0.0.1:45454"
    endpoints: tuple[str, ...] = ()
    pattern: Literal["pull", "sub", "req"] = "pull"
    bind: bool = False
    detector: Literal["jungfrau"] = "jungfrau"
    detector_id: str = "SPB_IRDA_JF4M"
    modules: tuple[int, ...] = (1,)
    input_source: str = "{detector_id}/DET/JNGFR{module:02d}:daqOutput"
    gain_mode: Literal["auto", "bits", "array"] = "auto"
    idle_timeout: float = 0.0

    def check(self) -> None:
        _require(
            self.endpoint.startswith(("tcp://", "ipc://", "inproc://")),
            "endpoint",
            f"must be a ZeroMQ endpoint like 'tcp://host:port'. Got {self.endpoint!r}.",
        )
        for i, endpoint in enumerate(self.endpoints):
            _require(
                endpoint.startswith(("tcp://", "ipc://", "inproc://")),
                f"endpoints[{i}]",
                f"must be a ZeroMQ endpoint like 'tcp://host:port'. Got {endpoint!r}.",
            )
        _require(len(set(self.all_endpoints)) == len(self.all_endpoints), "endpoints",
                 "has duplicates")
        _require(len(self.modules) > 0, "modules", "must name at least one module")
        _require(
            all(1 <= m <= 99 for m in self.modules),
            "modules",
            f"JUNGFRAU modules are numbered from 1 to 99. Got {list(self.modules)}.",
        )
        _require(len(set(self.modules)) == len(self.modules), "modules", "has duplicates")
        _require(self.idle_timeout >= 0, "idle_timeout", "must be >= 0 (0 waits forever)")
        try:
            self.input_source.format(detector_id=self.detector_id, module=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"must be a template using {{detector_id}} and {{module}}: {exc}",
                key="input_source",
            ) from exc

    @property
    def all_endpoints(self) -> tuple[str, ...]:
        """The endpoints to receive from: ``endpoints``, or ``endpoint`` when that is empty."""
        return self.endpoints or (self.endpoint,)

    def source_name(self, module: int) -> str:
        """Input source name of one module."""
        return self.input_source.format(detector_id=self.detector_id, module=module)


@dataclass(frozen=True)
class CalibrationConfig:
    """Correction backend and constants."""

    backend: Literal["numba", "cython", "numpy"] = "numba"
    constants: str = "constants/jungfrau-JNGFR{module:02d}.h5"
    cells: int = 16
    synthesize_missing: bool = True

    def check(self) -> None:
        _require(self.cells in (1, 16), "cells", f"JUNGFRAU has 1 or 16 cells. Got {self.cells}.")
        try:
            self.constants.format(module=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"may only use the {{module}} placeholder: {exc}", key="constants"
            ) from None

    def constants_path(self, module: int) -> Path:
        """Constants file of one module (the template may use ``{module}``)."""
        return Path(self.constants.format(module=module))


@dataclass(frozen=True)
class OutputConfig:
    """Files: where they are built, where they are stored, how they are cut and compressed."""

    spool: str = "spool"
    destination: str = "file://data"
    run: int = 1
    proposal: int = 900000
    trains_per_file: int = 50
    detector_id: str = ""
    aggregator: str = "JNGFR"
    compression: Mapping[str, str] = field(
        default_factory=lambda: {
            "adc": "bitshuffle-lz4",
            "gain": "bitshuffle-lz4",
            "mask": "bitshuffle-lz4",
        }
    )

    def check(self) -> None:
        from .store import PROPOSAL_RANGE, RUN_RANGE

        for key, value, (lo, hi) in (
            ("run", self.run, RUN_RANGE),
            ("proposal", self.proposal, PROPOSAL_RANGE),
        ):
            _require(lo <= value <= hi, key, f"must be from {lo} to {hi}. Got {value}.")
        _require(
            self.trains_per_file >= 1,
            "trains_per_file",
            f"must be >= 1. Got {self.trains_per_file}.",
        )
        _require(
            bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,15}", self.aggregator)),
            "aggregator",
            f"must be a letter then up to 15 letters or digits. Got {self.aggregator!r}.",
        )
        unknown = set(self.compression) - {"adc", "gain", "mask"}
        _require(
            not unknown,
            "compression",
            f"knows the datasets adc, gain and mask. Got {sorted(unknown)}.",
        )


@dataclass(frozen=True)
class EventsConfig:
    """Storage events (the outbox lives in the spool directory)."""

    outbox: str = ""
    cell_name: str = "calstream"
    cell_domain: str = ""
    storage_info: str = ""


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus endpoint and the status line."""

    port: int = 0
    host: str = "127.0.0.1"
    status: Literal["auto", "line", "log", "off"] = "auto"

    def check(self) -> None:
        _require(0 <= self.port <= 65535, "port",
                 f"must be from 0 (off) to 65535. Got {self.port}.")


@dataclass(frozen=True)
class PreviewConfig:
    """Re-publishing some corrected trains on a Karabo Bridge endpoint for live viewers."""

    endpoint: str = ""
    pattern: Literal["pub", "rep"] = "pub"
    every: int = 10
    max_rate: float = 2.0

    def check(self) -> None:
        _require(
            not self.endpoint or self.endpoint.startswith(("tcp://", "ipc://", "inproc://")),
            "endpoint",
            f"must be empty (off) or a ZeroMQ endpoint like 'tcp://*:4600'. Got {self.endpoint!r}.",
        )
        _require(self.every >= 1, "every", f"must be >= 1 (1: every train). Got {self.every}.")
        _require(self.max_rate >= 0, "max_rate", f"must be >= 0 Hz (0: no limit). Got "
                 f"{self.max_rate}.")


@dataclass(frozen=True)
class SimulateConfig:
    """An in-process sender for demos and tests (off for a real detector)."""

    enabled: bool = True
    trains: int = 100
    rate: float = 0.0
    gain_mode: Literal["bits", "array"] = "bits"
    first_train_id: int = 10000
    seed: int = 0

    def check(self) -> None:
        _require(self.trains >= 1, "trains", f"must be >= 1. Got {self.trains}.")
        _require(
            self.rate >= 0, "rate", f"must be >= 0 (0 = as fast as possible). Got {self.rate}."
        )


@dataclass(frozen=True)
class Config:
    """The whole pipeline configuration."""

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    path: str = EMBEDDED

    @property
    def output_detector_id(self) -> str:
        return self.output.detector_id or self.source.detector_id

    def output_source(self, module: int) -> str:
        """Corrected source name of one module, as EXtra-data's JUNGFRAU component expects."""
        return f"{self.output_detector_id}/CORR/JNGFR{module:02d}:output"

    def check(self) -> None:
        """Checks across sections: the source names the files will hold."""
        from .store import check_source_name

        key = "output.detector_id" if self.output.detector_id else "source.detector_id"
        for module in self.source.modules:
            try:
                check_source_name(self.output_source(module), key=key)
            except ConfigError as exc:
                raise ConfigError(
                    f"gives the corrected source name {self.output_source(module)!r}, which "
                    "must be slash-separated words of letters, digits, _ and -",
                    key=key,
                ) from exc

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("path")
        return out


_SECTIONS: dict[str, type] = {
    "pipeline": PipelineConfig,
    "source": SourceConfig,
    "calibration": CalibrationConfig,
    "output": OutputConfig,
    "events": EventsConfig,
    "simulate": SimulateConfig,
    "metrics": MetricsConfig,
    "preview": PreviewConfig,
}


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, key=key)


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> Config:
    """Read, override and validate a pipeline configuration.

    Parameters
    ----------
    path
        A TOML file, or None for the embedded defaults (the demo).
    overrides
        ``section.key=value`` strings; the value is read as TOML when it parses, else as text.

    Raises
    ------
    ConfigError
        Naming the file, the key and the reason.
    """
    where = str(path) if path is not None else EMBEDDED
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError("config file not found", source=where) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", source=where) from None
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", source=where) from None
    for item in overrides:
        _apply_override(raw, item, where)
    try:
        return _build(raw, where)
    except ConfigError as exc:
        if exc.source is None:
            raise ConfigError(exc.message, source=where, key=exc.key) from None
        raise


def _apply_override(raw: dict[str, Any], item: str, where: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise ConfigError(
            f"--set takes section.key=value. Got {item!r}.", source="--set", key=key or None
        )
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    *sections, leaf = key.split(".")
    node = raw
    for name in sections:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError("is not a section", source=where, key=name)
        node = child
    node[leaf] = value


def _build(raw: Mapping[str, Any], where: str) -> Config:
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f"unknown section; known: {', '.join(_SECTIONS)}", key=name)
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError("must be a table", key=name)
        sections[name] = _build_section(name, cls, table)
    config = Config(**sections, path=where)
    config.check()
    return config


def _build_section(section: str, cls: type, table: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            raise ConfigError(f"unknown key; known: {', '.join(fields)}", key=dotted)
        kwargs[key] = _coerce(value, hints[key], dotted)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(exc.message, key=f"{section}.{exc.key}") from None
    return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check a TOML value against a field's type hint and convert lists to tuples."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"must be one of {allowed}. Got {value!r}.", key=key)
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"must be a list. Got {value!r}.", key=key)
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or origin is getattr(types, "MappingProxyType", None):
        if not isinstance(value, dict):
            raise ConfigError(f"must be a table. Got {value!r}.", key=key)
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false. Got {value!r}.", key=key)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer. Got {value!r}.", key=key)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"must be a number. Got {value!r}.", key=key)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"must be a string. Got {value!r}.", key=key)
        return value
    return value
