"""The machine's livesplice configuration and kill-switch.

``/etc/livesplice/livesplice.conf`` (``$LIVESPLICE_ETC`` overrides the directory)::

    [livesplice]
    repo = https://updates.example.com/livesplice   # where upgrade and the agent look
    channel = stable                                # or testing, ...
    autoinstall = no          # the agent upgrades from the repository on its own (timer)
    install_on_reboot = yes   # the agent re-applies accepted updates at boot / process start

Everything is off or empty by default; an unknown key or a bad value is an error naming the
line, so a typo never silently disables a safety setting.

Kill-switch: ``livesplice=off`` on the kernel command line, or the file
``/etc/livesplice/disable``: the agent applies nothing and says why.
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import dataclass
from pathlib import Path

from livesplice.errors import UsageError

_BOOL = {
    "yes": True,
    "true": True,
    "on": True,
    "1": True,
    "no": False,
    "false": False,
    "off": False,
    "0": False,
}


def etc_dir() -> Path:
    """The configuration directory (LIVESPLICE_ETC for tests, else /etc/livesplice)."""
    return Path(os.environ.get("LIVESPLICE_ETC", "/etc/livesplice"))


@dataclass(frozen=True)
class Config:
    """livesplice.conf as read: the repository, its channel and what may happen unattended."""

    repo: str = ""
    channel: str = "stable"
    autoinstall: bool = False
    install_on_reboot: bool = True


def load_config(path: Path | None = None) -> Config:
    """Read livesplice.conf (defaults when absent); a file that cannot be parsed is a usage error
    naming it, not a silently ignored setting."""
    path = path or etc_dir() / "livesplice.conf"
    if not path.exists():
        return Config()
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",))
    try:
        parser.read_string(path.read_text(), str(path))
    except (configparser.Error, OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: {e}") from None
    extra = [s for s in parser.sections() if s != "livesplice"]
    if extra:
        raise UsageError(f"{path}: unknown section [{extra[0]}] (only [livesplice])")
    if not parser.has_section("livesplice"):
        return Config()
    sec = parser["livesplice"]
    values: dict[str, object] = {}
    for key, raw in sec.items():
        if key not in Config.__dataclass_fields__:
            raise UsageError(
                f"{path}: unknown setting {key!r}",
                advice=f"known: {', '.join(Config.__dataclass_fields__)}",
            )
        if key in ("autoinstall", "install_on_reboot"):
            if raw.lower() not in _BOOL:
                raise UsageError(f"{path}: {key} = {raw!r} is not yes/no")
            values[key] = _BOOL[raw.lower()]
        elif key == "channel" and not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", raw):
            raise UsageError(f"{path}: channel = {raw!r} is not a channel name")
        else:
            values[key] = raw
    return Config(**values)  # type: ignore[arg-type]


def disabled() -> str:
    """Why livesplice must not apply anything automatically now ("" if it may)."""
    cmdline = Path(os.environ.get("LIVESPLICE_CMDLINE", "/proc/cmdline"))
    try:
        words = cmdline.read_text().split()
    except OSError:
        words = []
    if "livesplice=off" in words:
        return f"livesplice=off is on the kernel command line ({cmdline})"
    flag = etc_dir() / "disable"
    if flag.exists():
        return f"{flag} exists"
    return ""
