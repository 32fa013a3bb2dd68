"""``livesplice lab``: argument parsing (kept import-light; the lab itself loads lazily)."""

from __future__ import annotations

import argparse
from typing import Any


def add_lab_parser(sub: Any) -> None:
    lab = sub.add_parser("lab", help="boot a Debian kernel in a throwaway QEMU VM (kernel lab)")
    lab.add_subparsers(dest="lab_command", metavar="LABCOMMAND")


def cli_lab(args: argparse.Namespace) -> int:
    from livesplice.errors import UsageError

    raise UsageError("the kernel lab is not implemented yet")
