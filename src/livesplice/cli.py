"""The ``livesplice`` command: one entry point, subcommands, documented exit codes.

The engine raises typed :class:`~livesplice.errors.LivespliceError` s; only this module turns
them into text for a person and into an exit code (see README "Exit codes").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from livesplice import __version__
from livesplice.errors import ExitCode, LivespliceError, NotApplied, UsageError
from livesplice.text import printable


def _env_path(var: str) -> Path | None:
    value = os.environ.get(var)
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and option of the livesplice command (lab: cli_lab.py)."""
    p = argparse.ArgumentParser(
        prog="livesplice",
        description="Rebootless, restartless updates from source patches (Ksplice-style).",
    )
    p.add_argument("--version", action="version", version=f"livesplice {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("create", help="turn a source patch into an update file")
    c.add_argument(
        "srcdir",
        metavar="SRCDIR",
        type=Path,
        nargs="?",
        help="source tree (unpatched); or give --debian",
    )
    c.add_argument("--patch", required=True, type=Path, help="the fix, as a unified diff")
    c.add_argument(
        "--build", help="build command (default: make; with --debian: dpkg-buildpackage -B)"
    )
    c.add_argument(
        "--debian",
        metavar="SOURCE=VERSION",
        help="instead of SRCDIR: this Debian source package version (e.g. "
        "redis=5:7.0.15-1~deb12u7), fetched and built as Debian did, the update verified "
        "against the binary packages of that version from the archive",
    )
    c.add_argument(
        "--clean-env",
        action="store_true",
        help="build in a clean environment, as Debian's buildds do (implied by --debian)",
    )
    c.add_argument("--id", dest="update_id", help="update id (default: random 8 characters)")
    c.add_argument("-o", "--output", type=Path, help="update file (default: livesplice-ID.update)")
    c.add_argument("--description", help="one line describing the update")
    c.add_argument("-j", "--jobs", type=int, default=2, help="parallel build jobs (default 2)")
    c.add_argument("--keep-tmp", action="store_true", help="keep the build directory")
    c.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="do not show the stages on stderr (shown live at a terminal, as "
        "timestamped lines otherwise)",
    )
    c.add_argument(
        "--no-prebuild-cache",
        action="store_true",
        help="build the unpatched tree afresh and keep nothing (default: reuse the pre build "
        "of the same tree, build command, toolchain and environment from "
        "~/.cache/livesplice/prebuild, or $LIVESPLICE_PREBUILD_CACHE)",
    )
    c.add_argument(
        "--target",
        action="append",
        metavar="NAME",
        help="build the update for this linked executable/library only (repeatable; default: "
        "every one the patch changes); the other outputs the patch changes are listed",
    )
    c.add_argument(
        "--sign",
        type=Path,
        metavar="KEY",
        default=_env_path("LIVESPLICE_SIGNING_KEY"),
        help="sign the update with this Ed25519 key (default: $LIVESPLICE_SIGNING_KEY)",
    )
    c.add_argument(
        "--verify-against",
        action="append",
        type=Path,
        metavar="FILE",
        help="run-pre match the update against this shipped binary, directory or .deb and "
        "record the build-ids that match, so apply knows them under any name (repeatable)",
    )
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.add_argument(
        "--kernel",
        action="store_true",
        help="SRCDIR is a kernel tree prepared like the running kernel (see `lab prepare`)",
    )

    i = sub.add_parser("inspect", help="show what an update file contains")
    i.add_argument("update", metavar="UPDATE", type=Path)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        metavar="PUB",
        help="also trust this public key when judging the signature (as apply would)",
    )

    a = sub.add_parser("apply", help="splice an update into running processes")
    a.add_argument("update", metavar="UPDATE", type=Path)
    # no --pid/--all: a kernel update, applied to the running kernel
    who = a.add_mutually_exclusive_group()
    who.add_argument("--pid", type=int, action="append", help="target process (repeatable)")
    who.add_argument("--all", action="store_true", help="every process running a target")
    a.add_argument("--retries", type=int, default=5, help="stop-window attempts (default 5)")
    a.add_argument(
        "--retry-interval", type=float, default=1.0, help="seconds between attempts (default 1)"
    )
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        metavar="PUB",
        help="trust this public key (repeatable; also the *.pub files in "
        "$LIVESPLICE_TRUST_DIR or /etc/livesplice/trusted-keys)",
    )
    a.add_argument(
        "--allow-unsigned",
        action="store_true",
        default=os.environ.get("LIVESPLICE_ALLOW_UNSIGNED") == "1",
        help="apply an unsigned update (or one signed by an unknown key); a machine-wide "
        "policy for labs: LIVESPLICE_ALLOW_UNSIGNED=1. A bad signature is always refused.",
    )

    a.add_argument(
        "--transition-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="kernel updates: give up (and revert) when tasks have not switched in S seconds",
    )

    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing updates")
    k.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="private key file (the public key goes to OUTPUT.pub)",
    )

    v = sub.add_parser("view", help="list updates applied to running processes")
    v.add_argument("--pid", type=int, action="append", help="only this process (repeatable)")
    v.add_argument("--json", action="store_true", help="machine-readable output")

    u = sub.add_parser("undo", help="remove an applied update from running processes")
    u.add_argument("update_id", metavar="ID")
    uwho = u.add_mutually_exclusive_group()
    uwho.add_argument("--pid", type=int, action="append", help="target process (repeatable)")
    uwho.add_argument("--all", action="store_true", help="every process with the update")
    u.add_argument(
        "--from-target",
        type=Path,
        metavar="UPDATE",
        help="no journal entry (/run/livesplice cleared): undo from the record inside the "
        "process, after checking it against the process's mappings and this signed update",
    )
    u.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        metavar="PUB",
        help="trust this public key for --from-target's update (repeatable)",
    )
    u.add_argument(
        "--allow-unsigned",
        action="store_true",
        default=os.environ.get("LIVESPLICE_ALLOW_UNSIGNED") == "1",
        help="accept an unsigned update for --from-target",
    )
    u.add_argument("--retries", type=int, default=5)
    u.add_argument("--retry-interval", type=float, default=1.0)
    u.add_argument("--json", action="store_true")

    from livesplice.cli_lab import add_lab_parser
    from livesplice.service.cli import add_parsers as add_service_parsers

    add_lab_parser(sub)
    add_service_parsers(sub)
    return p


def _say_kept(workdir: Path) -> None:
    """``create --keep-tmp``: where the build directory was kept, to inspect a build."""
    print(f"livesplice: kept the build directory {workdir}")


def cmd_create(args: argparse.Namespace) -> int:
    """create: a process update, or a kernel update with --kernel."""
    from livesplice.create import create_update

    if args.kernel:
        from livesplice.cli_kernel import cli_create_kernel

        if args.srcdir is None or args.debian:
            raise UsageError(
                "a kernel update is made from a prepared kernel tree (SRCDIR)",
                advice="see `livesplice lab prepare`",
            )
        return cli_create_kernel(args)

    from livesplice.build.prebuild import PrebuildCache
    from livesplice.cli_progress import create_progress
    from livesplice.errors import TargetUnchanged

    prebuild = None if args.no_prebuild_cache else PrebuildCache()
    try:
        with create_progress(args.quiet) as progress:
            result = create_update(
                args.srcdir,
                args.patch,
                build_cmd=args.build,
                update_id=args.update_id,
                output=args.output,
                description=args.description,
                jobs=args.jobs,
                keep_workdir=_say_kept if args.keep_tmp else None,
                signing_key=args.sign,
                targets=args.target,
                verify_against=args.verify_against,
                debian=args.debian,
                clean_env=args.clean_env,
                progress=progress,
                prebuild=prebuild,
            )
    except TargetUnchanged as e:
        if args.json:  # the list for scripts too; the paragraph still goes to stderr
            print(
                json.dumps(
                    {
                        "status": "target_unchanged",
                        "message": e.reason,
                        "id": None,
                        "output": None,
                        "other_outputs": e.outputs,
                    },
                    indent=1,
                )
            )
        raise
    others = [o.to_dict() for o in result.other_outputs]
    if args.json:
        out: dict[str, Any] = {
            "status": "created" if result.manifest else "nothing_to_do",
            "message": result.message,
            "output": str(result.output) if result.output else None,
            "id": result.manifest.id if result.manifest else None,
            "targets": [
                {
                    "name": t.name,
                    "kind": t.kind,
                    "changed_functions": t.changed_functions,
                    "new_functions": t.new_functions,
                    "new_data": t.new_data,
                }
                for t in (result.manifest.targets if result.manifest else [])
            ],
            "other_outputs": others,
            "verified": [
                asdict(v) | {"target": t.name}
                for t in (result.manifest.targets if result.manifest else [])
                for v in t.verified
            ],
        }
        print(json.dumps(out, indent=1))
    else:
        print(f"livesplice: {result.message}")
        if result.manifest:
            from livesplice.process.verify import describe

            for t in result.manifest.targets:
                changed = ", ".join([*t.changed_functions, *t.new_functions]) or "data only"
                print(f"livesplice:   {printable(t.name)} ({t.kind}): {printable(changed)}")
            for line in describe({t.name: t.verified for t in result.manifest.targets}):
                print(f"livesplice:   {printable(line)}")
            for w in result.manifest.warnings:
                print(f"livesplice: warning: {w}")
        if result.other_outputs:
            print(
                "livesplice: note: the patch also changes outputs that are not in this "
                "update (--target left them out):"
            )
            for o in result.other_outputs:
                print(f"livesplice:   {printable(o.describe())}")
            print(
                "livesplice:   build an update for them with --target NAME (or without "
                "--target: every changed output)"
            )
    return ExitCode.OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """inspect: what an update file contains, judged against the trusted keys."""
    from livesplice.update.archive import read_update
    from livesplice.update.inspect import inspect_json, inspect_text

    update = read_update(args.update)
    if args.json:
        print(json.dumps(inspect_json(update, args.trusted_key), indent=1, sort_keys=True))
    else:
        print(inspect_text(update, args.trusted_key))
    return ExitCode.OK


def cmd_apply(args: argparse.Namespace) -> int:
    """apply: verify the signature first, then hand the update to the kernel or process target."""
    from livesplice.update.archive import load_update

    # the signature is checked before anything in the file is decompressed or parsed
    update = load_update(args.update, args.trusted_key, allow_unsigned=args.allow_unsigned)
    signer = update.signer
    if not args.json:
        print(
            f"livesplice: update {update.manifest.id} "
            + (f"signed by key {signer}" if signer else "is NOT signed (--allow-unsigned)")
        )
    if update.manifest.is_kernel:
        if args.pid or args.all:
            raise UsageError("this is a kernel update: apply it without --pid/--all")
        from livesplice.cli_kernel import cli_apply_kernel

        return cli_apply_kernel(args, update)
    if not (args.pid or args.all):
        raise UsageError("say which processes to patch: --pid PID (repeatable) or --all")
    from livesplice.cli_process import cli_apply

    return cli_apply(args, update)


def cmd_keygen(args: argparse.Namespace) -> int:
    """keygen: a new Ed25519 key pair; never overwrites an existing key."""
    from livesplice.update.signing import generate_key

    pub = args.output.with_name(args.output.name + ".pub")
    for p in (args.output, pub):
        if p.exists():
            raise UsageError(f"{p} exists; refusing to overwrite a key")
    pair = generate_key()
    try:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pair.private_pem)
        pub.write_bytes(pair.public_pem)
    except OSError as e:
        raise UsageError(f"cannot write the key: {e}") from None
    print(f"livesplice: key {pair.key_id}: private {args.output}, public {pub}")
    print(
        "livesplice: install the .pub file in /etc/livesplice/trusted-keys on the machines "
        "that apply your updates"
    )
    return ExitCode.OK


def _livepatch_dir() -> Path:
    """/sys/kernel/livepatch, as the kernel engine names it (one place for tests to move)."""
    from livesplice.kernel.target import LIVEPATCH

    return LIVEPATCH


def cmd_view(args: argparse.Namespace) -> int:
    """view: updates in processes and, without --pid, in the running kernel."""
    from livesplice.cli_process import cli_view

    kernel = not args.pid and _livepatch_dir().is_dir()
    if args.json:
        # one JSON document: processes and, on a machine with livepatch, the kernel
        kernel_rows = None
        if kernel:
            from livesplice.kernel.target import view_kernel

            kernel_rows = [r.to_dict() for r in view_kernel()]
        return cli_view(args, kernel_rows)
    if not kernel:
        return cli_view(args)
    from livesplice.cli_kernel import print_kernel_view
    from livesplice.kernel.target import view_kernel

    # kernel first read, so "no updates applied to processes" is not printed above a listed
    # kernel update as if nothing were applied
    kernel_views = view_kernel()
    rc = cli_view(args, say_none=not kernel_views)
    print_kernel_view(kernel_views)
    return rc


def cmd_undo(args: argparse.Namespace) -> int:
    """undo: without --pid/--all a kernel update (or a hint naming the processes that have it)."""
    from livesplice.update.format import check_update_id

    check_update_id(args.update_id)
    if not (args.pid or args.all):
        from livesplice.kernel.target import is_applied_to_kernel

        if is_applied_to_kernel(args.update_id):
            from livesplice.cli_kernel import cli_undo_kernel

            return cli_undo_kernel(args)
        from livesplice.process.apply import processes_with

        pids = processes_with(args.update_id)
        if pids:
            raise UsageError(
                f"update {printable(args.update_id)} is not a kernel update; it is applied to "
                f"process(es) {', '.join(map(str, pids))}",
                advice="say which: --pid PID (repeatable) or --all",
            )
        raise NotApplied(
            f"update {printable(args.update_id)} is not applied to the kernel nor to any process"
        )
    from livesplice.cli_process import cli_undo

    vouch = None
    if args.from_target is not None:
        from livesplice.update.archive import load_update

        vouch = load_update(
            args.from_target, args.trusted_key, allow_unsigned=args.allow_unsigned
        ).manifest
    return cli_undo(args, vouch)


def cmd_lab(args: argparse.Namespace) -> int:
    """lab: the QEMU kernel lab."""
    from livesplice.cli_lab import cli_lab

    return cli_lab(args)


COMMANDS = {
    "keygen": cmd_keygen,
    "lab": cmd_lab,
    "create": cmd_create,
    "inspect": cmd_inspect,
    "apply": cmd_apply,
    "view": cmd_view,
    "undo": cmd_undo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; typed errors become their paragraph on stderr and their exit code."""
    from livesplice.service.cli import COMMANDS as SERVICE_COMMANDS

    COMMANDS.update(SERVICE_COMMANDS)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    try:
        return COMMANDS[args.command](args)
    except LivespliceError as e:
        print(e.render(), file=sys.stderr)
        return int(e.code)
    except KeyboardInterrupt:
        print("livesplice: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return ExitCode.OK
