"""The words and exit codes of ``livesplice lab`` (kept import-light; the lab loads lazily).

livesplice lab prepare [--kernel 6.1.176-1]     # prints KSRC (the prepared source tree)
livesplice lab run [--kernel V] [--flavour F] [--modules NAME ...] [--file F[:DEST] ...] -- CMD ...
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from livesplice.kernel.initramfs import GuestFile

    # what ArgumentParser.add_subparsers returns (typeshed's name for it)
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]

DEFAULT_KERNEL = "6.1.176-1"  # same as livesplice.kernel.debian.DEFAULT_KERNEL (import-light)


def add_lab_parser(sub: Subcommands) -> None:
    """``livesplice lab`` and its subcommands (prepare, run)."""
    lab = sub.add_parser("lab", help="boot a Debian kernel in a throwaway QEMU VM (kernel lab)")
    lsub = lab.add_subparsers(dest="lab_command", metavar="LABCOMMAND")

    def kernel_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--kernel",
            default=DEFAULT_KERNEL,
            metavar="VERSION",
            help=f"Debian linux-image package version (default {DEFAULT_KERNEL})",
        )
        p.add_argument(
            "--flavour", default="cloud-amd64", help="Debian kernel flavour (default cloud-amd64)"
        )
        p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    p = lsub.add_parser(
        "prepare",
        help="fetch and prepare a Debian kernel once (cached); prints KSRC",
        description="Download the image, headers and source packages of one Debian "
        "kernel (nothing is installed), prepare the source tree with Debian's configuration "
        "and build identity, and build the lab's initramfs. Cached under $LIVESPLICE_CACHE "
        "(default ~/.cache/livesplice)/kernel/VERSION; an interrupted prepare resumes.",
    )
    kernel_options(p)
    p.add_argument("-j", "--jobs", type=int, help="make jobs (default: number of CPUs)")

    r = lsub.add_parser(
        "run",
        help="boot the kernel in a throwaway VM, run CMD, exit with its status",
        description="Boot the prepared kernel under QEMU (TCG), run CMD as root with sh in "
        "/payload (arguments are joined with spaces, as ssh does), print its output and exit "
        "with its status. Prepares the kernel first if needed.",
    )
    kernel_options(r)
    r.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="SRC[:DEST]",
        help="copy a host file or directory into the guest (DEST relative to /payload; "
        "default its name); repeatable",
    )
    r.add_argument(
        "--modules",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAME",
        help="modules of the image package to load (with modprobe, dependencies first) before "
        "any --update and CMD; a module that fails to load ends the run with its status",
    )
    r.add_argument(
        "--update",
        action="append",
        default=[],
        metavar="UPDATE",
        help="apply a kernel update in the guest with livesplice before CMD (repeatable, in "
        "order); a failing apply ends the run with its exit status",
    )
    r.add_argument("--timeout", type=float, default=180.0, help="seconds (default 180)")
    r.add_argument("--memory", type=int, default=512, help="guest memory in MiB (default 512)")
    r.add_argument("--cpus", type=int, default=1, help="guest CPUs (default 1)")
    r.add_argument("--append", default="", help="extra kernel command line")
    r.add_argument("--keep-tmp", type=Path, metavar="DIR", help="keep initrd and logs in DIR")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="command to run")


def _progress(quiet: bool) -> Callable[[str], None] | None:
    if quiet:
        return None
    return lambda msg: print(f"livesplice lab: {msg}", file=sys.stderr, flush=True)


def _guest_files(specs: list[str]) -> list[GuestFile]:
    from livesplice.errors import UsageError
    from livesplice.kernel.initramfs import GuestFile

    files: list[GuestFile] = []
    for spec in specs:
        src, _, dest = spec.partition(":")
        path = Path(src)
        if not path.exists():
            raise UsageError(f"--file {spec}: {src} does not exist")
        files.append(GuestFile(path, dest or path.name))
    return files


def update_script(updates: list[str], command: str, modules: list[str] | None = None) -> str:
    """Guest shell: load each module, apply each update with livesplice (stop at the first
    failure), run CMD. Modules first: a fix inside a module needs it loaded to be applied."""
    lines = [f"modprobe {shlex.quote(m)} || exit $?" for m in modules or []]
    lines += [f"livesplice apply {u} || exit $?" for u in updates]
    return "\n".join([*lines, command])


def cli_lab(args: argparse.Namespace) -> int:
    """``lab prepare`` prints the prepared tree (stdout: for scripts); ``lab run`` boots a
    guest and runs one command in it."""
    from livesplice.errors import UsageError

    if args.lab_command == "prepare":
        from livesplice.kernel.lab import prepare_lab, stage_timings

        lab = prepare_lab(args.kernel, args.flavour, jobs=args.jobs, progress=_progress(args.quiet))
        if not args.quiet:
            took = sum(stage_timings(lab).values())
            print(
                f"livesplice lab: {lab.release} ready (stages took {took:.0f} s when built); "
                f"vmlinuz {lab.vmlinuz}",
                file=sys.stderr,
            )
        print(lab.ksrc)
        return 0
    if args.lab_command == "run":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            raise UsageError("lab run: no command given", advice="livesplice lab run -- CMD ...")
        files = _guest_files(args.file)
        from livesplice.kernel.guest import Guest
        from livesplice.kernel.lab import prepare_lab

        lab = prepare_lab(args.kernel, args.flavour, progress=_progress(args.quiet))
        extra: list[Path] = []
        if args.modules:
            # the base initramfs has no /lib/modules: without this initrd busybox modprobe
            # fails with "can't change directory to '<release>'"
            from livesplice.kernel.modules import modules_initrd

            extra.append(modules_initrd(lab, args.modules))
        updates = [f"updates/{i}-{Path(u).name}" for i, u in enumerate(args.update)]
        if args.update:
            from livesplice.kernel.overlay import ensure_overlay

            files += _guest_files([f"{u}:{g}" for u, g in zip(args.update, updates, strict=True)])
            extra.append(ensure_overlay(lab.dir))
        command = update_script(updates, " ".join(cmd), args.modules)
        guest = Guest(
            lab,
            memory_mb=args.memory,
            cpus=args.cpus,
            timeout=args.timeout,
            append=args.append,
            extra_initrds=extra,
        )
        result = guest.run(command, files, keep_dir=args.keep_tmp)
        sys.stdout.write(result.output)
        sys.stdout.flush()
        if not args.quiet:
            boot = f"{result.uptime_at_init:.1f}" if result.uptime_at_init is not None else "?"
            print(
                f"livesplice lab: exit status {result.status}; boot to /init {boot} s, "
                f"whole run {result.wall_seconds:.1f} s",
                file=sys.stderr,
            )
        return result.status
    raise UsageError("lab: expected a subcommand", advice="livesplice lab {prepare,run} --help")
