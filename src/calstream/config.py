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
    "KafkaConfig",
    "MetricsConfig",
    "OutputConfig",
    "PipelineConfig",
    "PreviewConfig",
    "ShipConfig",
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
    detector: str = "jungfrau"
    detector_id: str = ""  # empty: the detector's typical name (registry)
    modules: tuple[int, ...] = (1,)
    input_source: str = ""  # empty: the detector's raw source template (registry)
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
        from .calibrate.registry import detector_names

        _require(
            self.detector in detector_names(),
            "detector",
            f"must be one of {', '.join(detector_names())}. Got {self.detector!r}.",
        )
        _require(len(self.modules) > 0, "modules", "must name at least one module")
        first = self.spec.first_module
        _require(
            all(first <= m <= 99 for m in self.modules),
            "modules",
            f"{self.detector} modules are numbered from {first} to 99. Got {list(self.modules)}.",
        )
        _require(len(set(self.modules)) == len(self.modules), "modules", "has duplicates")
        _require(self.idle_timeout >= 0, "idle_timeout", "must be >= 0 (0 waits forever)")
        try:
            names = {self.resolved().source_name(m) for m in self.modules}
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"must be a template using {{detector_id}} and {{module}}: {exc}",
                key="input_source",
            ) from exc
        _require(
            len(names) == len(self.modules), "input_source",
            f"gives the same source name to several modules ({sorted(names)}): use {{module}}",
        )

    @property
    def spec(self) -> Any:
        """The detector's registry entry (:class:`~calstream.calibrate.DetectorSpec`)."""
        from .calibrate.registry import get_detector

        return get_detector(self.detector)

    def resolved(self) -> SourceConfig:
        """This config with the detector's defaults filled in where a key was left empty."""
        if self.detector_id and self.input_source:
            return self
        spec = self.spec
        return dataclasses.replace(
            self,
            detector_id=self.detector_id or spec.detector_id,
            input_source=self.input_source or spec.raw_source,
        )

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
    constants: str = ""  # empty: constants/<detector>-<module name>.h5
    cells: int = 0  # 0: the detector's default (JUNGFRAU 16, AGIPD/LPD 64, ePix100 1)
    synthesize_missing: bool = True
    photon_energy: float = 0.0
    common_mode: bool = False
    cm_threshold: float = 0.0  # 0: the detector's default

    def check(self) -> None:
        _require(self.cells >= 0, "cells", f"must be >= 1 (0: the detector's default). Got "
                 f"{self.cells}.")
        _require(self.photon_energy >= 0 and self.photon_energy != float("inf"),
                 "photon_energy",
                 f"must be > 0 (photon counts) or 0 (float32 energies). Got {self.photon_energy}.")
        _require(self.cm_threshold >= 0, "cm_threshold",
                 f"must be > 0 (0: the detector's default). Got {self.cm_threshold}.")
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
    aggregator: str = ""  # empty: the detector's (JNGFR, AGIPD, LPD, EPIX)
    compression: Mapping[str, str] = field(
        default_factory=lambda: {
            "adc": "bitshuffle-lz4",
            # gain and mask are mostly zeros: plain LZ4 packs them tighter than bitshuffle
            # and 3-4x faster (measured on a corrected JUNGFRAU train; README *Codecs*)
            "gain": "lz4",
            "mask": "lz4",
        }
    )
    bytes_per_file: int | str = 0
    bitround: int = 0
    uploads: int = 2
    token_file: str = ""
    ca_bundle: str = ""
    verify_tls: bool = True
    store_timeout: float = 60.0
    store_deadline: float = 600.0
    upload_rename: bool = True
    retry_unstored: float = 60.0
    retention: Literal["delete", "keep"] = "delete"
    spool_limit: int | str = 0
    overflow: Literal["block", "stop"] = "block"

    @property
    def max_file_bytes(self) -> int | None:
        """``bytes_per_file`` in bytes; None: no limit."""
        return parse_size(self.bytes_per_file, "bytes_per_file") or None

    @property
    def spool_limit_bytes(self) -> int | None:
        """``spool_limit`` in bytes; None: no limit."""
        return parse_size(self.spool_limit, "spool_limit") or None

    def webdav_settings(self) -> Any:
        """Token, TLS and retry settings for a WebDAV destination."""
        from .store import WebdavSettings

        return WebdavSettings(
            token_file=self.token_file,
            ca_bundle=self.ca_bundle,
            verify_tls=self.verify_tls,
            timeout=self.store_timeout,
            deadline=self.store_deadline,
            rename=self.upload_rename,
        )

    def check(self) -> None:
        from .store import PROPOSAL_RANGE, RUN_RANGE, parse_codec
        from .store.bitround import MANTISSA_BITS

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
            not self.aggregator
            or bool(re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,15}", self.aggregator)),
            "aggregator",
            f"must be a letter then up to 15 letters or digits. Got {self.aggregator!r}.",
        )
        unknown = set(self.compression) - {"adc", "data", "gain", "mask"}
        _require(
            not unknown,
            "compression",
            f"knows the datasets adc, gain and mask (data: another name for adc). "
            f"Got {sorted(unknown)}.",
        )
        _require(
            not {"adc", "data"} <= set(self.compression),
            "compression",
            "names the corrected data twice: adc and data are the same dataset",
        )
        for dataset, spec in self.compression.items():
            try:
                parse_codec(spec)
            except ConfigError as exc:
                raise ConfigError(exc.message, key=f"compression.{dataset}") from None
        parse_size(self.bytes_per_file, "bytes_per_file")
        parse_size(self.spool_limit, "spool_limit")
        _require(
            0 <= self.bitround <= MANTISSA_BITS,
            "bitround",
            f"keeps 1 to {MANTISSA_BITS} mantissa bits of float32 data (0: lossless). "
            f"Got {self.bitround}.",
        )
        _require(self.uploads >= 1, "uploads", f"must be >= 1. Got {self.uploads}.")
        _require(self.store_timeout > 0, "store_timeout", "must be > 0 seconds")
        _require(self.store_deadline > 0, "store_deadline", "must be > 0 seconds")
        _require(self.retry_unstored >= 0, "retry_unstored",
                 "must be >= 0 seconds (0: retry only at the next start)")
        if self.token_file and "://" in self.destination:
            _require(
                not self.destination.lower().startswith("file:"),
                "token_file",
                "is for davs:// and https:// destinations; file:// needs none",
            )


_KAFKA_COMPRESSION = ("none", "gzip", "snappy", "lz4", "zstd")
_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclass(frozen=True)
class KafkaConfig:
    """``[events.kafka]``: where storage events are published; no bootstrap servers: no Kafka.

    Passwords never appear in the config: ``sasl_password_file`` names a file holding it,
    ``sasl_password_env`` an environment variable; :meth:`password` reads it.
    """

    bootstrap_servers: tuple[str, ...] = ()
    topic: str = "calstream.storage"
    client_id: str = "calstream"
    idempotence: Literal["auto", "on", "off"] = "auto"
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "gzip"
    linger_ms: int = 5
    max_batch_bytes: int = 262144
    batch_events: int = 500
    request_timeout_ms: int = 30000
    retry_interval: float = 2.0
    warn_every: float = 60.0
    flush_timeout: float = 10.0
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_check_hostname: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str = ""
    sasl_password_file: str = ""
    sasl_password_env: str = ""

    @property
    def enabled(self) -> bool:
        """Whether events go to Kafka at all."""
        return bool(self.bootstrap_servers)

    def check(self) -> None:
        for i, server in enumerate(self.bootstrap_servers):
            host, sep, port = server.rpartition(":")
            _require(
                bool(sep and host and port.isdigit() and 0 < int(port) < 65536),
                f"bootstrap_servers[{i}]",
                f"must be HOST:PORT. Got {server!r} instead.",
            )
        _require(
            0 < len(self.topic) <= 249 and set(self.topic) <= _TOPIC_CHARS
            and self.topic not in (".", ".."),
            "topic",
            f"must be 1 to 249 of the characters a-z A-Z 0-9 . _ -. Got {self.topic!r}.",
        )
        for key in ("linger_ms", "request_timeout_ms"):
            _require(getattr(self, key) >= 0, key, f"must be >= 0. Got {getattr(self, key)}.")
        for key in ("max_batch_bytes", "batch_events"):
            _require(getattr(self, key) >= 1, key, f"must be >= 1. Got {getattr(self, key)}.")
        for key in ("retry_interval", "warn_every", "flush_timeout"):
            _require(getattr(self, key) > 0, key, f"must be > 0 s. Got {getattr(self, key)}.")
        if self.compression != "none":
            from aiokafka import codec

            _require(
                getattr(codec, f"has_{self.compression}")(),
                "compression",
                f"{self.compression!r} needs a codec library aiokafka cannot import here "
                "(e.g. pip install cramjam); 'gzip' always works",
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                name = getattr(self, key)
                _require(not name or Path(name).is_file(), key, f"no such file: {name!r}")
            _require(
                not self.ssl_keyfile or bool(self.ssl_certfile), "ssl_keyfile",
                "needs ssl_certfile as well",
            )
        if self.security_protocol.startswith("SASL"):
            _require(bool(self.sasl_username), "sasl_username", "is required for SASL")
            _require(
                bool(self.sasl_password_file) != bool(self.sasl_password_env),
                "sasl_password_file",
                "SASL needs exactly one of sasl_password_file or sasl_password_env",
            )
            self.password()

    def password(self) -> str | None:
        """The SASL password from its file or environment variable (None without SASL)."""
        if not self.security_protocol.startswith("SASL"):
            return None
        if self.sasl_password_env:
            value = os.environ.get(self.sasl_password_env)
            _require(
                bool(value), "sasl_password_env",
                f"environment variable {self.sasl_password_env} is not set or empty",
            )
            return str(value)
        try:
            value = Path(self.sasl_password_file).read_text(encoding="utf-8").strip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot read {self.sasl_password_file!r}: {exc.strerror}",
                key="sasl_password_file",
            ) from None
        _require(bool(value), "sasl_password_file", f"{self.sasl_password_file!r} is empty")
        return value


@dataclass(frozen=True)
class EventsConfig:
    """Storage events (the outbox lives in the spool directory)."""

    outbox: str = ""
    cell_name: str = "calstream"
    cell_domain: str = ""
    storage_info: str = ""
    kafka: KafkaConfig = field(default_factory=KafkaConfig)


@dataclass(frozen=True)
class ShipConfig:
    """``[ship]``: the shipping consumer (``calstream ship CONFIG``) reading ``[events.kafka]``.

    Copies every announced file to ``destination``; ``group_id`` names the consumer group that
    shares the topic's partitions among all ``calstream ship`` processes.
    """

    destination: str = ""
    group_id: str = "calstream-ship"
    from_beginning: bool = True
    retries: int = 5
    retry_interval: float = 2.0
    idle_timeout: float = 0.0
    # the second site, when it is a WebDAV door (as output's keys of the same names)
    token_file: str = ""
    ca_bundle: str = ""
    verify_tls: bool = True
    store_timeout: float = 60.0
    store_deadline: float = 600.0
    upload_rename: bool = True
    # reading from the first site's WebDAV door; empty: output.token_file, output.ca_bundle
    source_token_file: str = ""
    source_ca_bundle: str = ""
    staging: str = ""

    def webdav_settings(self) -> Any:
        """Token, TLS and retry settings for a WebDAV second site."""
        from .store import WebdavSettings

        return WebdavSettings(
            token_file=self.token_file, ca_bundle=self.ca_bundle, verify_tls=self.verify_tls,
            timeout=self.store_timeout, deadline=self.store_deadline, rename=self.upload_rename,
        )

    def source_webdav_settings(self, output: OutputConfig) -> Any:
        """Settings for reading files from the first site's door (``[output]``'s by default)."""
        from .store import WebdavSettings

        return WebdavSettings(
            token_file=self.source_token_file or output.token_file,
            ca_bundle=self.source_ca_bundle or output.ca_bundle,
            verify_tls=output.verify_tls,
            timeout=output.store_timeout,
            deadline=self.store_deadline,
        )

    def check(self) -> None:
        _require(
            not self.destination or "://" in self.destination,
            "destination",
            f"must be a URL like 'file:///remote/site'. Got {self.destination!r}.",
        )
        _require(bool(self.group_id), "group_id", "must not be empty")
        _require(self.retries >= 0, "retries", f"must be >= 0. Got {self.retries}.")
        _require(self.retry_interval > 0, "retry_interval", "must be > 0 s")
        _require(self.idle_timeout >= 0, "idle_timeout", "must be >= 0 (0 waits forever)")
        _require(self.store_timeout > 0, "store_timeout", "must be > 0 seconds")
        _require(self.store_deadline > 0, "store_deadline", "must be > 0 seconds")


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
    ship: ShipConfig = field(default_factory=ShipConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    path: str = EMBEDDED

    def __post_init__(self) -> None:
        # Keys left empty take the detector's defaults, so `calstream check` shows real values.
        from .calibrate.registry import detector_names

        if self.source.detector not in detector_names():
            return  # SourceConfig.check says so
        source = self.source.resolved()
        spec = source.spec
        cal = self.calibration
        calibration = dataclasses.replace(
            cal,
            constants=cal.constants or f"constants/{spec.name}-{spec.module_name}.h5",
            cells=cal.cells or spec.default_cells,
            cm_threshold=cal.cm_threshold or spec.cm_threshold,
        )
        output = dataclasses.replace(
            self.output, aggregator=self.output.aggregator or spec.aggregator
        )
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "calibration", calibration)
        object.__setattr__(self, "output", output)

    @property
    def output_detector_id(self) -> str:
        return self.output.detector_id or self.source.detector_id

    def output_source(self, module: int) -> str:
        """Corrected source name of one module, as EXtra-data's detector components expect
        (``<id>/CORR/JNGFR01:output``, ``<id>/CORR/3CH0:output``, ...)."""
        return self.source.spec.corr_source.format(
            detector_id=self.output_detector_id, module=module
        )

    def check(self) -> None:
        """Checks across sections: cells and options against the detector, the source names
        the files will hold."""
        from .store import check_source_name

        spec = self.source.spec
        cal = self.calibration
        spec.check_cells(cal.cells)
        if cal.common_mode and not spec.common_mode:
            with_cm = [n for n in _detector_specs() if n.common_mode]
            raise ConfigError(
                f"{spec.name} has no common-mode correction (only "
                f"{', '.join(s.name for s in with_cm)}). Set it to false.",
                key="calibration.common_mode",
            )
        if len({self.output_source(m) for m in self.source.modules}) != len(self.source.modules):
            raise ConfigError(
                f"{spec.name} has one module per detector name; give each its own "
                "source.detector_id (one process per ePix100)", key="source.modules",
            )

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


def _detector_specs() -> list[Any]:
    from .calibrate.registry import detector_names, get_detector

    return [get_detector(name) for name in detector_names()]


_SECTIONS: dict[str, type] = {
    "pipeline": PipelineConfig,
    "source": SourceConfig,
    "calibration": CalibrationConfig,
    "output": OutputConfig,
    "events": EventsConfig,
    "simulate": SimulateConfig,
    "ship": ShipConfig,
    "metrics": MetricsConfig,
    "preview": PreviewConfig,
}


_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(value: int | str, key: str) -> int:
    """Bytes from an integer or a text like ``"4GB"``, ``"1.5 GiB"``, ``"500MB"`` (0: none).

    Raises
    ------
    ConfigError
        Not a size (key ``key``).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("kmgtib")
        unit = text[len(digits) :]
        try:
            number = int(float(digits) * _SIZE_UNITS[unit])
        except (ValueError, KeyError):
            number = -1
    else:
        number = -1
    if number < 0:
        raise ConfigError(
            f"must be a size in bytes like 4000000000 or \"4GB\" (0: no limit). Got {value!r}.",
            key=key,
        )
    return number


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
    if dataclasses.is_dataclass(hint):  # a sub-table such as [events.kafka]
        if not isinstance(value, dict):
            raise ConfigError(f"must be a table. Got {value!r}.", key=key)
        return _build_section(key, hint, value)
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
