"""Debian's own redis-server and its real security update, for ``bench_soak.py --daemon redis``.

The target is what a Debian 12 machine runs: redis-server from the archive's
redis-tools/redis-server .debs of the corpus row's *shipped* version (corpus/debian-shipped.csv,
row ``redis``), started through the package's ``/usr/bin/redis-server`` symlink to
redis-check-rdb, exactly as ``python -m livesplice.eval corpus/debian-shipped.csv`` runs it.
The update is the row's real security update, built by the product's own machinery (the
eval's fetch, tree split and ``livesplice create --verify-against`` the shipped .debs): the
soak measures the update an operator would apply, on the binary they run.

Building it takes minutes (two package builds), so the update and the unpacked binaries are
kept under ``~/.cache/livesplice/soak/`` (``$LIVESPLICE_SOAK_CACHE``) in an entry keyed by
the livesplice source and the corpus row: a changed engine or row builds a new update, an
unchanged one starts the soak at once. Downloads and trees are the eval's cache
(``~/.cache/livesplice/eval``, ``$LIVESPLICE_EVAL_CACHE``), the pre build livesplice's
prebuild cache, so nothing is fetched or built twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import livesplice
from livesplice.build.debian import fetch_binaries, fetch_source_version
from livesplice.eval.corpus import CorpusRow, read_corpus, select_rows
from livesplice.eval.create_step import run_create
from livesplice.eval.runner import shipped_target
from livesplice.eval.sources import fetch_source, install_build_deps, make_shipped_trees

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "corpus" / "debian-shipped.csv"
# bumped when what an entry holds changes (not the update: its inputs are in the key)
ENTRY_FORMAT = "1"
# entries kept (~6 MB each): every change to livesplice makes a new one
KEEP_ENTRIES = 4


@dataclass(frozen=True)
class ShippedRedis:
    """A built soak entry: Debian's redis-server as installed and the update that fits it."""

    binary: Path  # <entry>/root/usr/bin/redis-server: the package's symlink
    update: Path
    update_id: str
    shipped_version: str
    fixed_version: str
    functions: list[str]
    verified: list[str]  # create --verify-against: which archive file the update fits

    def describe(self) -> str:
        """One line for the soak's report: which binary, which update."""
        return (
            f"Debian redis-server {self.shipped_version} (the archive's binary, "
            f"{self.binary.name} -> {os.readlink(self.binary)}), update {self.update_id} = "
            f"the security update to {self.fixed_version}, "
            f"{len(self.functions)} function(s): {', '.join(self.functions)}"
        )


def soak_cache() -> Path:
    """Where built soak entries live (root-only, like the other livesplice caches)."""
    return Path(
        os.environ.get("LIVESPLICE_SOAK_CACHE", Path.home() / ".cache" / "livesplice" / "soak")
    )


def eval_cache() -> Path:
    """The evaluation's cache (downloads, trees), shared so a soak never fetches again."""
    return Path(
        os.environ.get("LIVESPLICE_EVAL_CACHE", Path.home() / ".cache" / "livesplice" / "eval")
    )


def redis_row() -> CorpusRow:
    """The corpus row of Debian's redis security update on its shipped binary."""
    [row] = select_rows(read_corpus(CORPUS), "redis")
    return row


def entry_key(row: CorpusRow) -> str:
    """A digest of everything the update is made from on this side: every file of the
    livesplice package (create's build, diff and package steps, and apply's expectations of
    the format) and the corpus row. The toolchain and the .debs are pinned by the row's
    versions and checked by create's --verify-against."""
    h = hashlib.sha256(f"soak entry {ENTRY_FORMAT}\n".encode())
    h.update(json.dumps(asdict(row), sort_keys=True).encode())
    pkg = Path(livesplice.__file__).resolve().parent
    for f in sorted(p for p in pkg.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f"\0{f.relative_to(pkg)}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def prepare(log: Path | None = None) -> ShippedRedis:
    """The cached entry for the current livesplice source and corpus row, built first when
    there is none (fetch, trees, create: minutes; progress on stderr)."""
    row = redis_row()
    entry = soak_cache() / f"redis-{entry_key(row)}"
    meta = entry / "entry.json"
    if not meta.exists():
        build_entry(row, entry)
    doc = json.loads(meta.read_text())
    return ShippedRedis(
        binary=entry / doc["binary"],
        update=entry / "update",
        update_id=doc["update_id"],
        shipped_version=row.shipped_version,
        fixed_version=row.version,
        functions=doc["functions"],
        verified=doc["verified"],
    )


def say(msg: str) -> None:
    """Progress of the one-time build, on stderr."""
    print(f"soak redis: {msg}", file=sys.stderr, flush=True)


def build_entry(row: CorpusRow, entry: Path) -> None:
    """Fetch, split, create and unpack as the shipped eval does (eval/runner.py's ``_run``),
    into a temporary directory renamed into place only when complete, so an interrupted
    build is never taken for an entry."""
    cache = eval_cache()
    rowdir = cache / "rows" / row.slug
    rowdir.mkdir(parents=True, exist_ok=True)
    say(f"building the update once into {entry} (fetch, two package builds: minutes)")
    fixed = fetch_source(row, cache)
    shipped = fetch_source_version(row.package, row.shipped_version, cache)
    debs = fetch_binaries(row.package, row.shipped_version, row.binaries.split(), cache)
    trees = make_shipped_trees(row, shipped, fixed, rowdir)
    install_build_deps(shipped, trees.pre)
    work = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        say(f"livesplice create (fix {' '.join(trees.fix_patches)}), log {work}/create.log")
        created = run_create(
            trees.pre,
            trees.fix_patch,
            work / "update",
            row.update_id,
            work / "create.log",
            target=row.target,
            verify=debs,
        )
        if created.workdir is not None:
            shutil.rmtree(created.workdir, ignore_errors=True)
        if created.status != "created":
            raise SystemExit(
                f"soak redis: create did not make the update ({created.status}): "
                f"{created.reason}\n  " + "\n  ".join(created.details)
            )
        binary = shipped_target(debs, work / "root", row.target)
        if binary is None:
            raise SystemExit(f"soak redis: the packages {row.binaries} install no {row.target}")
        from livesplice.update.archive import read_update

        manifest = read_update(work / "update").manifest
        (work / "entry.json").write_text(
            json.dumps(
                {
                    "binary": str(binary.relative_to(work)),
                    "update_id": row.update_id,
                    "functions": [f for t in manifest.targets for f in t.changed_functions],
                    "verified": [
                        f"{v['origin']}: {v['file']} (build-id {v['build_id']})"
                        for v in created.verified
                    ],
                },
                indent=1,
            )
        )
        shutil.rmtree(entry, ignore_errors=True)
        work.rename(entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"built in {created.seconds:.0f} s")
    prune(entry.parent)


def prune(cache: Path) -> None:
    """Keep the newest :data:`KEEP_ENTRIES` complete entries (an entry older than the
    livesplice it was built by is never used again)."""
    done = sorted(
        (d for d in cache.glob("redis-*") if (d / "entry.json").exists()),
        key=lambda d: (d / "entry.json").stat().st_mtime,
        reverse=True,
    )
    for old in done[KEEP_ENTRIES:]:
        shutil.rmtree(old, ignore_errors=True)


def resp(*words: str) -> bytes:
    """One command in RESP (the redis protocol): an array of bulk strings."""
    out = f"*{len(words)}\r\n".encode()
    for w in words:
        out += f"${len(w.encode())}\r\n{w}\r\n".encode()
    return out


class RedisControl:
    """The harness's own connection to the soaked redis-server: readiness, a data set so a
    BGSAVE child has work to do, periodic BGSAVE (a fork in the target while apply and undo
    run), and the server's own counters at the end. Not part of the measured load."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""
        self.bgsaves = 0  # BGSAVEs the server started
        # (sent, answered) of each started BGSAVE: redis forks inside the command, before
        # it answers, so the fork happened within this span
        self.fork_spans: list[tuple[float, float]] = []
        self.busy = 0  # BGSAVEs refused because the previous child was still saving
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def connect(self, timeout: float = 20.0) -> None:
        """Wait until the server answers PING (it has just been started)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                if self.command("PING") == b"+PONG":
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _line(self) -> bytes:
        assert self.sock is not None
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the control connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> bytes:
        """One reply: a status/error/integer line, or a bulk string's body."""
        line = self._line()
        if not line.startswith(b"$") or line == b"$-1":
            return line
        n = int(line[1:])
        while len(self.buf) < n + 2:
            assert self.sock is not None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the control connection")
            self.buf += chunk
        body, self.buf = self.buf[:n], self.buf[n + 2 :]
        return body

    def command(self, *words: str) -> bytes:
        """Send one command and read its reply."""
        assert self.sock is not None
        self.sock.sendall(resp(*words))
        return self.reply()

    def populate(self, keys: int, size: int = 100) -> None:
        """``keys`` keys of ``size`` bytes (pipelined MSETs): what a BGSAVE child writes out."""
        assert self.sock is not None
        value = "v" * size
        batch = 1000
        for start in range(0, keys, batch):
            words = ["MSET"]
            for k in range(start, min(keys, start + batch)):
                words += [f"data:{k}", value]
            self.sock.sendall(resp(*words))
        for _ in range(0, keys, batch):
            if (r := self.reply()) != b"+OK":
                raise RuntimeError(f"redis refused the data set: {r!r}")

    def bgsave_every(self, seconds: float) -> None:
        """Start a thread asking for a BGSAVE every ``seconds``."""
        self._thread = threading.Thread(target=self._bgsave_loop, args=(seconds,), daemon=True)
        self._thread.start()

    def _bgsave_loop(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            t0 = time.perf_counter()
            try:
                r = self.command("BGSAVE")
            except OSError as e:
                self.errors.append(f"BGSAVE: {e}")
                return
            if r.startswith(b"+Background saving started"):
                self.bgsaves += 1
                self.fork_spans.append((t0, time.perf_counter()))
            elif b"in progress" in r:
                self.busy += 1
            else:
                self.errors.append(f"BGSAVE: {r.decode(errors='replace')}")

    def stop(self) -> None:
        """Stop asking for BGSAVEs (the reply being read is waited for)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def info(self) -> dict[str, str]:
        """The server's INFO fields (``total_forks``, ``rdb_last_bgsave_status``, ...)."""
        text = self.command("INFO", "everything").decode(errors="replace")
        return dict(
            ln.split(":", 1) for ln in text.splitlines() if ":" in ln and not ln.startswith("#")
        )


def config(rundir: Path, port: int) -> Path:
    """A throwaway configuration: loopback only, no automatic saves (the harness asks for
    BGSAVE itself), the RDB file in the run directory, in the foreground."""
    conf = rundir / "redis.conf"
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {rundir}\n'
        f"daemonize no\nprotected-mode no\nlogfile {rundir / 'redis.log'}\n"
    )
    return conf


def start(redis: ShippedRedis, rundir: Path, port: int) -> subprocess.Popen[bytes]:
    """Debian's redis-server, started by the package's own name (the symlink), as the eval
    does: apply must find it by build-id, not by file name."""
    rundir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(redis.binary), str(config(rundir, port))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        cwd=rundir,
    )


def realtime_threads(pid: int, prio: int, *, main_only: bool = False) -> int:
    """The server's threads SCHED_FIFO at ``prio`` (``--rt-load``), with
    SCHED_RESET_ON_FORK so a BGSAVE child writes at normal priority instead of taking a CPU
    at realtime priority for its whole save. All threads by default, not only the main one:
    the stop window waits for every thread to reach its stop, and a bio thread at normal
    priority, woken by the interrupt on a CPU busy with the BGSAVE child or other jobs,
    waits for its turn -- 2-75 ms measured at load ~4, the event loop held stopped meanwhile.
    That case is livesplice's to solve; ``main_only`` (``--rt-main-only``) reproduces it,
    the default isolates livesplice's own stops from the machine's load, as for kvserver.
    Returns how many threads were set."""
    tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    for tid in [pid] if main_only else tids:
        os.sched_setscheduler(tid, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(prio))
    return 1 if main_only else len(tids)


# what redis logs when something went wrong (server.c, rdb.c, debug.c of 7.0): a crash
# report, an assertion, a failed or killed background save
TROUBLE = (
    "BUG REPORT",
    "crashed by signal",
    "ASSERTION FAILED",
    "Guru Meditation",
    "Background saving error",
    "Background saving terminated by signal",
    "Failed opening the temp RDB file",
    "Write error saving DB on disk",
    "Can't save in background",
)


def read_log(rundir: Path) -> tuple[int, list[str]]:
    """From redis's own log: the background saves that ended well, and the lines that say
    something went wrong."""
    try:
        lines = (rundir / "redis.log").read_text(errors="replace").splitlines()
    except OSError as e:
        return 0, [f"no redis.log: {e}"]
    saved = sum("Background saving terminated with success" in ln for ln in lines)
    return saved, [ln for ln in lines if any(t in ln for t in TROUBLE)]
