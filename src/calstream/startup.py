"""Start-up checks: fail fast, with one clear message, before any socket opens.

The constants are checked where they are loaded (shape, cells); here: that they exist when
they may not be synthesized, that the destination takes files and that the spool has room for
the files being built.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["check_constants_present", "check_destination_writable", "check_spool_space"]


def check_constants_present(config: Any) -> None:
    """Require every module's constants file when ``calibration.synthesize_missing`` is off.

    Raises
    ------
    ConfigError
        ``calibration.constants`` of the config file, naming the missing file and its module.
    """
    cal = config.calibration
    if cal.synthesize_missing:
        return
    for module in config.source.modules:
        path = cal.constants_path(module)
        if not path.is_file():
            raise ConfigError(
                f"constants file not found: {path} (module {module}; "
                "calibration.synthesize_missing = false)",
                source=config.path, key="calibration.constants",
            )


def check_destination_writable(destination: Any) -> None:
    """Create and remove a hidden probe file at a ``file://`` destination's root.

    Other destinations (no ``root`` attribute) are checked by their first upload.

    Raises
    ------
    ConfigError
        ``output.destination``, naming the directory and the system's reason.
    """
    root = getattr(destination, "root", None)
    if not isinstance(root, Path):
        return
    probe = root / f".calstream-probe-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"destination {root} does not take files ({exc.strerror or exc}); fix its "
            "permissions or point output.destination elsewhere",
            key="output.destination",
        ) from None


def check_spool_space(spool: Path, need: int) -> None:
    """Require ``need`` free bytes in the spool (the files built at once, at worst).

    Raises
    ------
    ConfigError
        ``output.spool``, with the free and the needed space and what to change.
    """
    try:
        free = shutil.disk_usage(spool).free
    except OSError as exc:
        raise ConfigError(f"cannot check the free space in {spool}: {exc.strerror or exc}",
                          key="output.spool") from None
    if free < need:
        raise ConfigError(
            f"spool {spool} has {free / 1e9:.2f} GB free but the open files may need up to "
            f"{need / 1e9:.2f} GB; free some space, or lower output.trains_per_file",
            key="output.spool",
        )
