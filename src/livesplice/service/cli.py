"""The service's commands: ``repo``, ``upgrade``, ``show``, ``remove``, ``uname``, ``agent``.

Only this module (with livesplice.cli) prints and picks exit codes for the service.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from livesplice.cli_progress import progress_printer
from livesplice.errors import ExitCode, UsageError
from livesplice.text import printable

if TYPE_CHECKING:
    from livesplice.cli_lab import Subcommands


def add_parsers(sub: Subcommands) -> None:
    """The service's subcommands and their options (added to the livesplice parser)."""
    r = sub.add_parser("repo", help="make and fill a repository of signed updates")
    rsub = r.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    ri = rsub.add_parser("init", help="a new, empty repository signed with KEY")
    ri.add_argument("dir", type=Path, metavar="DIR")
    ri.add_argument("--key", type=Path, required=True, help="the repository's private key")
    ra = rsub.add_parser("add", help="add signed update files to the repository")
    ra.add_argument("dir", type=Path, metavar="DIR")
    ra.add_argument("updates", type=Path, nargs="+", metavar="UPDATE")
    ra.add_argument("--key", type=Path, required=True, help="the repository's private key")
    ra.add_argument("--channel", default="stable", help="stable (default), testing, ...")
    ra.add_argument("--cve", action="append", default=[], help="a CVE id it fixes (repeatable)")
    ra.add_argument("--effective-version", default="", help="label, e.g. 6.1.158-1+ls2")
    ra.add_argument(
        "--supersedes",
        action="append",
        default=[],
        metavar="ID",
        help="an update this cumulative one replaces (repeatable)",
    )
    ra.add_argument("--requires", action="append", default=[], metavar="ID")
    ra.add_argument(
        "--binary",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="a binary you ship for a target (its build-id is what machines run; repeatable)",
    )

    def common(p: argparse.ArgumentParser, repo: bool = True) -> None:
        if repo:
            p.add_argument(
                "--repo",
                metavar="URL",
                help="repository (directory, file://, http(s)://); "
                "default: repo = in /etc/livesplice/livesplice.conf",
            )
            p.add_argument("--channel", help="default: the configured one, else stable")
        p.add_argument(
            "--trusted-key",
            type=Path,
            action="append",
            metavar="PUB",
            help="trust this public key too (repeatable)",
        )
        p.add_argument("--json", action="store_true", help="machine-readable output")

    u = sub.add_parser("upgrade", help="apply what the repository has for this machine")
    common(u)
    u.add_argument("-y", "--yes", action="store_true", help="do not ask")
    u.add_argument("--dry-run", action="store_true", help="say what would be done")
    u.add_argument(
        "--auto",
        action="store_true",
        help="run only if autoinstall = yes in livesplice.conf and not switched off "
        "(the upgrade timer uses it)",
    )
    u.add_argument(
        "--release",
        metavar="ID",
        action="append",
        default=[],
        help="let the crash guard apply ID automatically again (repeatable)",
    )
    s = sub.add_parser("show", help="accepted updates and where they are applied")
    common(s)
    s.add_argument("--available", action="store_true", help="also what the repository offers")
    rm = sub.add_parser("remove", help="undo accepted updates everywhere and forget them")
    common(rm, repo=False)
    who = rm.add_mutually_exclusive_group(required=True)
    who.add_argument("ids", nargs="*", default=[], metavar="ID")
    who.add_argument("--all", action="store_true")
    un = sub.add_parser("uname", help="the effective kernel version (like uptrack-uname)")
    un.add_argument("-r", action="store_true", help="the release (the only field shown)")
    ag = sub.add_parser("agent", help="keep running and future processes patched")
    ag.add_argument("--once", action="store_true", help="patch what runs now, then exit")
    ag.add_argument(
        "--boot",
        action="store_true",
        help="re-apply accepted kernel updates (early boot), then exit",
    )
    ag.add_argument("--poll", action="store_true", help="use the /proc poller, not netlink")
    ag.add_argument("--trusted-key", type=Path, action="append", metavar="PUB")
    ag.add_argument("--json", action="store_true", help="log JSON lines to stdout")
    ag.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the manager page (loopback only), e.g. 127.0.0.1:8011",
    )


def _repo_url(args: argparse.Namespace) -> tuple[str, str]:
    from livesplice.service.config import load_config

    cfg = load_config()
    url = args.repo or cfg.repo
    if not url:
        raise UsageError(
            "no repository: pass --repo URL or set repo = in /etc/livesplice/livesplice.conf"
        )
    return url, args.channel or cfg.channel


def cmd_repo(args: argparse.Namespace) -> int:
    """``repo init`` / ``repo add``: make a repository, or sign and add updates to it."""
    from livesplice.service.index import repo_add, repo_init

    if args.repo_command == "init":
        kid = repo_init(args.dir, args.key)
        print(
            f"livesplice: repository {args.dir} made, signed by key {kid}; machines trust "
            f"it with {args.dir}/keys/{kid}.pub in /etc/livesplice/trusted-keys"
        )
        return ExitCode.OK
    for path in args.updates:
        e = repo_add(
            args.dir,
            args.key,
            path,
            channel=args.channel,
            cves=args.cve,
            effective_version=args.effective_version,
            supersedes=args.supersedes,
            requires=args.requires,
            binaries=args.binary,
        )
        print(
            f"livesplice: added {e.id} ({e.kind}, order {e.order}, channel {e.channel}, "
            f"targets {', '.join(t.name for t in e.targets)})"
        )
    return ExitCode.OK


def cmd_upgrade(args: argparse.Namespace) -> int:
    """``upgrade``: apply what the repository has for this machine (``--auto``: the agent's
    unattended run, which honours the kill-switch and configuration)."""
    from livesplice.service.client import Planned, upgrade
    from livesplice.service.store import Store

    if args.auto:
        from livesplice.service.config import disabled, load_config

        why = disabled() or (
            "" if load_config().autoinstall else "autoinstall is off in livesplice.conf"
        )
        if why:
            print(f"livesplice: not upgrading automatically: {why}")
            return ExitCode.OK
    store = Store()
    for uid in args.release:
        store.release(uid)
    url, channel = _repo_url(args)

    def confirm(go: list[Planned]) -> bool:
        if args.yes:
            return True
        if not sys.stdin.isatty():
            raise UsageError(
                "upgrade would change running programs; say -y to go ahead "
                "(or --dry-run to see what it would do)"
            )
        for p in go:
            where = "the running kernel" if p.kernel else f"pid(s) {p.pids}"
            print(f"  {p.entry.id}: {printable(p.entry.description)} -> {where}")
        return input("apply these updates? [y/N] ").strip().lower() in ("y", "yes")

    rep = upgrade(
        url,
        store=store,
        channel=channel,
        trusted=args.trusted_key,
        dry_run=args.dry_run,
        confirm=confirm,
        progress=progress_printer(args),
    )
    if args.json:
        print(json.dumps(rep.as_json(), indent=1))
    else:
        for p in rep.planned:
            what = {
                "apply": f"apply to {p['pids'] or 'the running kernel'}",
                "accept": "accept (no process runs its target now; the agent applies it "
                "when one starts)",
            }.get(p["action"], f"skip ({p['why']})")
            if rep.dry_run or p["action"] != "apply":
                print(f"livesplice: {p['id']}: {'would ' if rep.dry_run else ''}{what}")
        for r in rep.results:
            where = f"pid {r['pid']}" if "pid" in r else f"kernel {r.get('kernel')}"
            extra = (
                f": {r['abort']}: {printable(r['reason'])}"
                if r["status"] == "failed"
                else f": {printable(r.get('reason', ''))}"
                if r.get("reason")
                else ""
            )
            print(f"livesplice: {r['id']} {r['status']} ({where}){extra}")
        if not rep.planned:
            print("livesplice: nothing in the repository applies to this machine")
    return ExitCode.PARTIAL if rep.failed else ExitCode.OK


def cmd_show(args: argparse.Namespace) -> int:
    """``show``: what is accepted and applied here (``--available``: and what the repository
    offers)."""
    from livesplice.service.client import open_repo, show
    from livesplice.service.store import Store

    store = Store()
    repo = None
    channel = "stable"
    if args.available:
        url, channel = _repo_url(args)
        repo = open_repo(url, store, args.trusted_key)
    out = show(store, repo, channel)
    if args.json:
        print(json.dumps(out, indent=1))
        return ExitCode.OK
    print(f"Effective kernel version: {out['effective_kernel']}")
    if not out["accepted"]:
        print("Installed updates: none")
    else:
        print("Installed updates:")
    for a in out["accepted"]:
        cves = f" [{', '.join(a['cves'])}]" if a["cves"] else ""
        if a["kind"] == "kernel":
            where = "kernel: " + ("applied" if a.get("applied_to_kernel") else "NOT applied")
        else:
            where = f"applied to pid(s) {a['applied_to'] or 'none running'}"
            if a["not_applied_to"]:
                where += f"; NOT applied to pid(s) {a['not_applied_to']}"
        held = f"; HELD by the crash guard: {a['held']}" if a["held"] else ""
        print(f"[{a['id']}] {printable(a['description'])}{cves}: {where}{held}")
    if repo is not None:
        avail = [p for p in out["available"] if not p["why"]]
        print("Available updates:" if avail else "Available updates: none")
        for p in avail:
            print(f"[{p['id']}] for {p['pids'] or 'the kernel'}")
    return ExitCode.OK


def cmd_remove(args: argparse.Namespace) -> int:
    """``remove``: undo updates everywhere and forget them, so neither agent nor boot re-applies
    them."""
    from livesplice.service.client import remove
    from livesplice.service.store import Store

    store = Store()
    ids = [a.id for a in store.accepted()] if args.all else args.ids
    if args.all and not ids:
        if not args.json:
            print("livesplice: no accepted updates")
        else:
            print(json.dumps({"results": []}))
        return ExitCode.OK
    results = remove(store, ids)
    if args.json:
        print(json.dumps({"results": results}, indent=1))
    else:
        for r in results:
            where = f"pid {r['pid']}" if "pid" in r else "kernel"
            print(
                f"livesplice: {r['id']} {r['status']} ({where})"
                + (f": {r['abort']}: {printable(r['reason'])}" if r["status"] == "failed" else "")
            )
        print(f"livesplice: removed {', '.join(ids)}")
    return ExitCode.PARTIAL if any(r["status"] == "failed" for r in results) else ExitCode.OK


def cmd_uname(args: argparse.Namespace) -> int:
    """``uname``: the kernel version with the accepted kernel updates counted in, as scanners
    ask."""
    from livesplice.service.client import effective_kernel
    from livesplice.service.store import Store

    print(effective_kernel(Store()))
    return ExitCode.OK


def cmd_agent(args: argparse.Namespace) -> int:
    """``agent``: keep every running and future process patched (optionally serving the manager
    page)."""
    from livesplice.service.agent import run_agent
    from livesplice.service.store import Store

    http = None
    if args.http:
        host, _, port = args.http.rpartition(":")
        if not port.isdigit():
            raise UsageError(f"--http {args.http}: say HOST:PORT, e.g. 127.0.0.1:8011")
        http = (host or "127.0.0.1", int(port))
    return run_agent(
        Store(),
        args.trusted_key,
        force_poll=args.poll,
        once=args.once,
        boot=args.boot,
        log_json=args.json,
        http=http,
    )


COMMANDS = {
    "repo": cmd_repo,
    "upgrade": cmd_upgrade,
    "show": cmd_show,
    "remove": cmd_remove,
    "uname": cmd_uname,
    "agent": cmd_agent,
}
