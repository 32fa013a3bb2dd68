"""Step 2: the pre build running for real, under a steady load, with request accounting.

A daemon (redis-server, nginx, memcached, dnsmasq, sshd) runs on loopback with a
configuration written here, while a client thread sends requests over one long-lived
connection and, every few requests, over a fresh one; every request that does not get the
right answer counts as a failure. A library (libcurl, libxml2, libexpat) is loaded with
dlopen() by a small driver program that calls it in a loop and reports its counts; on SIGUSR1
the driver forks a child that runs the fix's reproducer (the child inherits the patched or
unpatched code as it is at that moment), so the reproducer runs inside the live process.

Targets are looked up by name in :data:`WORKLOADS`; a row whose target has no workload is
still built and classified (applied/refused/nothing), its live step reported as missing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from livesplice.errors import LivespliceError
from livesplice.process.procstat import children_of

READY_TIMEOUT = 20.0
IO_TIMEOUT = 5.0


class WorkloadFailed(LivespliceError):
    """The workload itself failed (did not start, or its driver does not build): the row's
    outcome is then the harness's, not livesplice's."""

    abort = "WORKLOAD_FAILED"


@dataclass
class LoadStats:
    """Requests made and failed while a workload runs, counted by its client thread; the runner
    compares snapshots taken before and after apply."""

    requests: int = 0
    failures: int = 0
    first_errors: list[str] = field(default_factory=list)

    def snapshot(self) -> tuple[int, int]:
        """(requests, failures) now: two snapshots bracket an apply, so the difference is what
        apply cost the clients."""
        return self.requests, self.failures


def free_port() -> int:
    """A TCP port that is free right now (the kernel picks it), so parallel rows never collide on
    a fixed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PingClients:
    """Connection churn: N threads, each connecting, sending ``PING``, expecting ``PONG``
    and closing, as fast as it can. Against a thread-per-connection server (examples/kvserver)
    every request makes a thread and ends one. Records each request's (start, seconds) and
    every failure."""

    def __init__(self, port: int, n: int = 4) -> None:
        self.port = port
        self.stop = threading.Event()
        self.samples: list[tuple[float, float]] = []
        self.failed: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            error = ""
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(b"PING\n")
                    got = s.recv(64)
                if got != b"PONG\n":
                    error = f"bad reply {got!r}"
            except OSError as e:
                error = str(e)
            dt = time.perf_counter() - t0
            with self._lock:
                self.samples.append((t0, dt))
                if error and len(self.failed) < 1000:
                    self.failed.append(error)

    @property
    def ok(self) -> int:
        """Requests that got their PONG."""
        return len(self.samples) - len(self.failed)

    @property
    def worst(self) -> float:
        """The slowest request's seconds: what a client felt of apply's stop window."""
        return max((dt for _, dt in self.samples), default=0.0)

    def close(self) -> None:
        """Stop the client threads and wait for them, so no request outlives the measurement."""
        self.stop.set()
        for t in self.threads:
            t.join(10)


def recv_until(sock: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    """Read from ``sock`` until ``done`` says the answer is complete; a closed connection is an
    error (the server crashed or dropped the client)."""
    data = b""
    while not done(data):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} bytes")
        data += chunk
    return data


class Workload(ABC):
    """A target process (or processes) under load. ``start`` -> ``pids`` ... ``stop``."""

    has_reproducer = False  # reproduce() tells vulnerable from fixed (a corpus CVE's own)

    def __init__(self, binary: Path, rundir: Path) -> None:
        self.binary = binary
        self.rundir = rundir
        self.stats = LoadStats()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = rundir / "target.log"

    @abstractmethod
    def start(self) -> None:
        """Start the target and make sure it answers before the measurement begins."""

    def pids(self) -> list[int]:
        """The processes to patch."""
        assert self.proc is not None
        return [self.proc.pid]

    def identities(self) -> dict[int, int | None]:
        """pid -> start time of each target process: the runner checks after apply that these are
        still the same processes (no restart happened behind its back)."""
        from livesplice.process.journal import process_start

        return {pid: process_start(pid) for pid in self.pids()}

    def reproduce(self) -> str | None:
        """Run the fix's reproducer against the live code: "vulnerable", "fixed" or None."""
        return None

    def stop(self) -> None:
        """Terminate the target, killing it when it ignores SIGTERM for 10 s, so a row never
        leaves a server running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def exited(self) -> str | None:
        """Why the target is gone (its exit status), or None while it runs."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"the target exited with status {self.proc.returncode}"
        return None

    def log_tail(self) -> list[str]:
        """The last lines of the target's log, the details of a WorkloadFailed."""
        try:
            return self.log.read_text(errors="replace").splitlines()[-10:]
        except OSError:
            return []

    def spawn(self, argv: list[str], **kw: object) -> None:
        """Start ``argv`` in its own session with output to the log, so a stop can signal the
        whole process group and the log tells why it died."""
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.rundir,
            start_new_session=True,
            **kw,
        )  # type: ignore[call-overload]
        out.close()


class DaemonWorkload(Workload):
    """A server plus a client thread; subclasses give the command line and one exchange."""

    fresh_every = 10  # every Nth request opens a new connection (exercises accept too)
    stream = True  # TCP with a long-lived connection; False: one socket per request (UDP)

    def __init__(self, binary: Path, rundir: Path) -> None:
        super().__init__(binary, rundir)
        self.port = free_port()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @abstractmethod
    def argv(self) -> list[str]:
        """The server's command line (its configuration written into the run directory)."""

    @abstractmethod
    def exchange(self, sock: socket.socket) -> None:
        """One request and its answer; raise on a wrong or missing answer."""

    def connect(self) -> socket.socket:
        """A connection to the server; a datagram server overrides this."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)
        return s

    def start(self) -> None:
        """Spawn the server, wait until one exchange succeeds, then start the client thread."""
        self.spawn(self.argv())
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if why := self.exited():
                raise WorkloadFailed(
                    f"{self.binary.name} did not start: {why}", details=self.log_tail()
                )
            try:
                with self.connect() as s:
                    self.exchange(s)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise WorkloadFailed(
                        f"{self.binary.name} did not answer on port {self.port}: {e}",
                        details=self.log_tail(),
                    ) from None
                time.sleep(0.1)
        self._thread = threading.Thread(target=self._load, daemon=True)
        self._thread.start()

    def _load(self) -> None:
        conn: socket.socket | None = None
        n = 0
        while not self._stop.is_set():
            n += 1
            fresh = (not self.stream) or conn is None or n % self.fresh_every == 0
            try:
                if fresh:
                    with self.connect() as s:
                        self.exchange(s)
                    if conn is None and self.stream:
                        conn = self.connect()
                else:
                    assert conn is not None
                    self.exchange(conn)
                self.stats.requests += 1
            except (OSError, ValueError) as e:
                self.stats.requests += 1
                self.stats.failures += 1
                if len(self.stats.first_errors) < 5:
                    self.stats.first_errors.append(f"request {n}: {e!r}")
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.001)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        """Stop the client thread before the server, so the server's exit is not counted as
        failed requests."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(IO_TIMEOUT * 2)
        super().stop()


class RedisWorkload(DaemonWorkload):
    """redis-server answering SET and GET."""

    def argv(self) -> list[str]:
        """redis with a throwaway configuration: loopback only, no persistence, no daemonizing."""
        conf = self.rundir / "redis.conf"
        conf.write_text(
            f'port {self.port}\nbind 127.0.0.1\nsave ""\nappendonly no\n'
            f"dir {self.rundir}\ndaemonize no\nprotected-mode no\n"
        )
        return [str(self.binary), str(conf)]

    def exchange(self, sock: socket.socket) -> None:
        """SET k v1 then GET k: the answer proves the request path works end to end."""
        sock.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        want = b"+OK\r\n$2\r\nv1\r\n"
        got = recv_until(sock, lambda d: len(d) >= len(want))
        if got != want:
            raise ValueError(f"redis answered {got!r}")


class MemcachedWorkload(DaemonWorkload):
    """memcached answering set and get."""

    def argv(self) -> list[str]:
        """memcached on loopback TCP only (UDP off), running as root as the runner does."""
        return [
            str(self.binary),
            "-l",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "0",
            "-u",
            "root",
            "-t",
            "2",
        ]

    def exchange(self, sock: socket.socket) -> None:
        """set k then get k: the answer proves the request path works end to end."""
        sock.sendall(b"set k 0 0 2\r\nv1\r\nget k\r\n")
        want = b"STORED\r\nVALUE k 0 2\r\nv1\r\nEND\r\n"
        got = recv_until(sock, lambda d: len(d) >= len(want))
        if got != want:
            raise ValueError(f"memcached answered {got!r}")


class NginxWorkload(DaemonWorkload):
    """Master + one worker; both are patched (the master forks future workers)."""

    def argv(self) -> list[str]:
        """nginx with a configuration of its own: one worker, temp paths and logs in the run
        directory, and a location that exercises the code the corpus fixes touch."""
        r = self.rundir
        conf = r / "nginx.conf"
        temps = "".join(
            f"    {k}_temp_path {r}/{k};\n"
            for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf.write_text(
            f"daemon off;\nmaster_process on;\nworker_processes 1;\npid {r}/nginx.pid;\n"
            f"error_log {r}/error.log;\nevents {{ worker_connections 256; }}\n"
            # nginx closes a keep-alive connection after keepalive_requests (default 1000)
            # requests; the client would count that as a failure
            f"http {{\n    access_log off;\n    keepalive_requests 1000000000;\n{temps}"
            f"    server {{\n        listen 127.0.0.1:{self.port};\n"
            f'        location / {{ return 200 "ok\\n"; }}\n'
            # the rewrite module runs on every request: the fix's code path stays hot
            f"        location /r/ {{ rewrite ^/r/(.*)$ /x?a=$1; set $v $1; "
            f'return 200 "$v\\n"; }}\n    }}\n}}\n'
        )
        return [str(self.binary), "-p", f"{r}/", "-e", f"{r}/error.log", "-c", str(conf)]

    def pids(self) -> list[int]:
        """The master and its workers: the master forks future workers from its own (patched)
        image."""
        assert self.proc is not None
        return [self.proc.pid, *children_of(self.proc.pid)]

    def exchange(self, sock: socket.socket) -> None:
        """A GET with its whole body read, so a crash in the worker shows as a failed request."""
        sock.sendall(b"GET /r/abc HTTP/1.1\r\nHost: eval\r\n\r\n")
        data = recv_until(sock, lambda d: b"\r\n\r\n" in d)
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise ValueError(f"nginx answered {head[:60]!r}")
        length = next(
            (
                int(h.split(b":")[1])
                for h in head.split(b"\r\n")
                if h.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("nginx closed mid-body")
            body += chunk

    def start(self) -> None:
        """Also wait for the worker, so the runner patches both processes."""
        super().start()
        deadline = time.monotonic() + READY_TIMEOUT
        while len(self.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)


class DnsmasqWorkload(DaemonWorkload):
    """dnsmasq answering A queries over UDP."""

    stream = False

    def argv(self) -> list[str]:
        """dnsmasq in the foreground with no upstream, answering one name from its own
        configuration."""
        return [
            str(self.binary),
            "-k",
            "--conf-file=/dev/null",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--address=/eval.test/10.9.8.7",
            "-u",
            "root",
            f"--pid-file={self.rundir}/dnsmasq.pid",
        ]

    def connect(self) -> socket.socket:
        """A UDP socket: dnsmasq answers datagrams, so each request is one send and one receive."""
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(IO_TIMEOUT)
        s.connect(("127.0.0.1", self.port))
        return s

    def exchange(self, sock: socket.socket) -> None:
        """One A query for eval.test; the answer must carry the configured address."""
        qid = os.getpid() & 0xFFFF
        name = b"".join(bytes([len(p)]) + p for p in (b"eval", b"test")) + b"\0"
        sock.send(struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1")
        reply = sock.recv(512)
        if len(reply) < 12 or struct.unpack(">H", reply[:2])[0] != qid or reply[3] & 0xF:
            raise ValueError(f"dnsmasq answered {reply[:16]!r}")
        if bytes([10, 9, 8, 7]) not in reply[12:]:
            raise ValueError("dnsmasq answer lacks 10.9.8.7")


class SshdWorkload(DaemonWorkload):
    """The listener (sshd forks a child per connection); a request = the version exchange."""

    stream = False

    def argv(self) -> list[str]:
        """sshd with a fresh host key and a configuration of its own on the workload's port."""
        r = self.rundir
        key = r / "host_ed25519"
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                check=True,
                capture_output=True,
            )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        conf = r / "sshd_config"
        conf.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {key}\n"
            f"PidFile {r}/sshd.pid\nUsePAM no\n"
        )
        return [str(self.binary.resolve()), "-D", "-e", "-f", str(conf)]

    def exchange(self, sock: socket.socket) -> None:
        """The version exchange: enough for sshd to fork a child that runs the patched code."""
        banner = recv_until(sock, lambda d: b"\n" in d)
        if not banner.startswith(b"SSH-2.0-"):
            raise ValueError(f"sshd answered {banner[:40]!r}")
        sock.sendall(b"SSH-2.0-livesplice_eval\r\n")


# ------------------------------------------------------------------------ libraries

DRIVER_MAIN = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void *lib;
static volatile sig_atomic_t repro_requested;
static void *sym(const char *name) {
    void *p = dlsym(lib, name);
    if (!p) { fprintf(stderr, "driver: %s: %s\n", name, dlerror()); exit(3); }
    return p;
}
static void on_usr1(int sig) { (void)sig; repro_requested = 1; }
static int setup(char **argv);
static int work(void);      /* one use of the library: 1 = right answer */
static int reproduce(void); /* child: exit 0 = fixed behaviour, 1 = vulnerable behaviour */

int main(int argc, char **argv) {
    (void)argc;
    lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) { fprintf(stderr, "driver: %s\n", dlerror()); return 3; }
    if (setup(argv) != 0) return 3;
    signal(SIGUSR1, on_usr1);
    unsigned long ok = 0, fail = 0;
    struct timespec last = {0}, now;
    for (;;) {
        if (work()) ok++; else fail++;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - last.tv_sec) * 1000000000L + (now.tv_nsec - last.tv_nsec) > 50000000L) {
            printf("count %lu %lu\n", ok, fail);
            fflush(stdout);
            last = now;
        }
        if (repro_requested) {
            repro_requested = 0;
            pid_t child = fork();
            if (child == 0) { alarm(20); _exit(reproduce()); }
            int status = 0;
            waitpid(child, &status, 0);
            if (WIFEXITED(status))
                printf("repro %s\n", WEXITSTATUS(status) == 0 ? "fixed" : "vulnerable");
            else
                printf("repro vulnerable signal %d\n", WTERMSIG(status));
            fflush(stdout);
        }
    }
}
"""

# libcurl: an HTTP GET per iteration from the harness's server. Reproducer of CVE-2023-38545
# (curl's test 728): a socks5h proxy with a 256-character host name; the fixed do_SOCKS5()
# fails with "too long to be resolved remotely", the vulnerable one falls back to resolving
# locally (and, with a slow proxy handshake, overflows its buffer).
DRIVER_CURL = r"""
typedef void CURL;
static CURL *(*easy_init)(void);
static int (*easy_setopt)(CURL *, int, ...);
static int (*easy_perform)(CURL *);
static void (*easy_cleanup)(CURL *);
static const char *url, *proxy;
static size_t sink(char *p, size_t s, size_t n, void *u) { (void)p; (void)u; return s * n; }
enum { URL_OPT = 10002, WRITEFUNCTION = 20011, PROXY_OPT = 10004, ERRORBUFFER = 10010,
       TIMEOUT = 13, NOSIGNAL = 99 };
static int setup(char **argv) {
    url = argv[2]; proxy = argv[3];
    int (*global_init)(long) = sym("curl_global_init");
    easy_init = sym("curl_easy_init"); easy_setopt = sym("curl_easy_setopt");
    easy_perform = sym("curl_easy_perform"); easy_cleanup = sym("curl_easy_cleanup");
    return global_init(3);
}
static int work(void) {
    CURL *c = easy_init();
    easy_setopt(c, URL_OPT, url);
    easy_setopt(c, WRITEFUNCTION, sink);
    easy_setopt(c, TIMEOUT, 5L);
    easy_setopt(c, NOSIGNAL, 1L);
    int rc = easy_perform(c);
    easy_cleanup(c);
    return rc == 0;
}
static int reproduce(void) {
    char host[300], target[400], err[256] = "";
    memset(host, 'A', 256); host[256] = 0;
    snprintf(target, sizeof target, "http://%s/", host);
    CURL *c = easy_init();
    easy_setopt(c, URL_OPT, target);
    easy_setopt(c, PROXY_OPT, proxy);
    easy_setopt(c, ERRORBUFFER, err);
    easy_setopt(c, TIMEOUT, 5L);
    easy_setopt(c, NOSIGNAL, 1L);
    easy_perform(c);
    return strstr(err, "too long") ? 0 : 1;
}
"""

# libxml2: resolve a URI through an in-memory XML catalog per iteration (the fixed function,
# xmlCatalogListXMLResolveURI, runs every time). Reproducer of CVE-2026-0990: a catalog whose
# nextCatalog names itself; the vulnerable resolver recurses until the stack overflows.
DRIVER_LIBXML2 = r"""
typedef void CAT;
static CAT *(*new_catalog)(int);
static int (*acatalog_add)(CAT *, const char *, const char *, const char *);
static char *(*acatalog_resolve_uri)(CAT *, const char *);
static CAT *cat;
static const char *loop_file;
static int setup(char **argv) {
    loop_file = argv[2];
    void (*init)(void) = sym("xmlInitParser");
    init();
    new_catalog = sym("xmlNewCatalog");
    acatalog_add = sym("xmlACatalogAdd");
    acatalog_resolve_uri = sym("xmlACatalogResolveURI");
    CAT *(*load)(const char *) = sym("xmlLoadACatalog");
    (void)new_catalog; (void)acatalog_add;
    cat = load(argv[3]);
    return cat == NULL;
}
static int work(void) {
    char *r = acatalog_resolve_uri(cat, "http://eval.test/a");
    int ok = r != NULL && strcmp(r, "file:///eval/a") == 0;
    free(r);
    return ok;
}
static int reproduce(void) {
    CAT *(*load)(const char *) = sym("xmlLoadACatalog");
    void (*set_warnings)(int) = sym("xmlCatalogSetDefaults");
    (void)set_warnings;
    CAT *loop = load(loop_file);
    if (!loop) return 2;
    char *r = acatalog_resolve_uri(loop, "http://eval.test/none");
    (void)r;
    return 0;
}
"""

# libexpat: parse a small document per iteration. No reproducer: the row's fix compiles to no
# code on x86-64 (it is under #if UINT_MAX >= SIZE_MAX).
DRIVER_EXPAT = r"""
typedef void *PARSER;
static PARSER (*create)(const char *);
static int (*parse)(PARSER, const char *, int, int);
static void (*parser_free)(PARSER);
static int setup(char **argv) {
    (void)argv;
    create = sym("XML_ParserCreate"); parse = sym("XML_Parse");
    parser_free = sym("XML_ParserFree");
    return 0;
}
static int work(void) {
    static const char doc[] = "<a x='1'><b>text</b><c/></a>";
    PARSER p = create(NULL);
    int ok = parse(p, doc, (int)sizeof doc - 1, 1) == 1;
    parser_free(p);
    return ok;
}
static int reproduce(void) { return 2; }
"""

URI_CATALOG = """<?xml version="1.0"?>
<catalog xmlns="urn:oasis:names:tc:entity:xmlns:xml:catalog">
  <uri name="http://eval.test/a" uri="file:///eval/a"/>
</catalog>
"""

LOOPING_CATALOG = """<?xml version="1.0"?>
<catalog xmlns="urn:oasis:names:tc:entity:xmlns:xml:catalog">
  <nextCatalog catalog="{path}"/>
</catalog>
"""


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class LibraryWorkload(Workload):
    """A driver program that dlopen()s the freshly built library and uses it in a loop."""

    driver_source = ""
    has_reproducer = False

    def __init__(self, binary: Path, rundir: Path) -> None:
        super().__init__(binary, rundir)
        self._reader: threading.Thread | None = None
        self._repro: list[str] = []
        self._repro_event = threading.Event()

    def driver_args(self) -> list[str]:
        """Extra arguments of the driver program, after the library's path."""
        return []

    def compile_driver(self) -> Path:
        """The driver program (built once per run directory)."""
        src, exe = self.rundir / "driver.c", self.rundir / "driver"
        if not exe.exists():
            src.write_text(DRIVER_MAIN + self.driver_source)
            cc = subprocess.run(
                ["gcc", "-O1", "-o", str(exe), str(src), "-ldl"],
                capture_output=True,
                text=True,
                check=False,
            )
            if cc.returncode != 0:
                raise WorkloadFailed(
                    "the library driver does not compile", details=cc.stderr.splitlines()[-10:]
                )
        return exe

    def start(self) -> None:
        """Start the driver and a thread that reads its counters; fail now if it dies at once."""
        exe = self.compile_driver()
        lib = self.binary  # the runner copies it under its soname into a directory of its own
        errlog = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(exe), str(lib), *self.driver_args()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errlog,
            cwd=self.rundir,
            start_new_session=True,
        )
        errlog.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while self.stats.requests == 0:
            if why := self.exited():
                raise WorkloadFailed(
                    f"the driver for {self.binary.name} stopped: {why}", details=self.log_tail()
                )
            if time.monotonic() > deadline:
                raise WorkloadFailed(f"the driver for {self.binary.name} reports nothing")
            time.sleep(0.05)
        if self.stats.failures:
            raise WorkloadFailed(f"the driver for {self.binary.name} fails from the start")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            words = raw.decode(errors="replace").split()
            if words[:1] == ["count"] and len(words) == 3:
                self.stats.requests, self.stats.failures = (
                    int(words[1]) + int(words[2]),
                    int(words[2]),
                )
            elif words[:1] == ["repro"]:
                self._repro.append(" ".join(words[1:]))
                self._repro_event.set()

    def reproduce(self) -> str | None:
        """Ask the driver (SIGUSR1) to run the fix's reproducer against the live library and
        report "vulnerable" or "fixed"."""
        if not self.has_reproducer or self.proc is None:
            return None
        self._repro_event.clear()
        os.kill(self.proc.pid, signal.SIGUSR1)
        if not self._repro_event.wait(40):
            return "no answer"
        return self._repro[-1]


# Any library: call one exported function with all-zero arguments, over and over. Which
# one is decided from the update (see GenericLibraryWorkload); the argument count is not
# known, so six zero registers (the psABI's integer argument registers) are passed.
DRIVER_GENERIC = r"""
typedef long (*ANYFN)(long, long, long, long, long, long);
static ANYFN fn;
static int setup(char **argv) { fn = (ANYFN)sym(argv[2]); return 0; }
static int work(void) { fn(0, 0, 0, 0, 0, 0); return 1; }
static int reproduce(void) { return 0; }
"""


class GenericLibraryWorkload(LibraryWorkload):
    """A library no dedicated workload knows: the driver keeps calling an exported function
    of the changed call graph (``candidates``, best first) with zero arguments -- the first
    that survives such calls in a probe run (a function that dereferences its NULL argument
    is skipped). It keeps the patched code hot while apply runs; it checks survival, not
    answers."""

    driver_source = DRIVER_GENERIC

    def __init__(self, binary: Path, rundir: Path, candidates: list[str]) -> None:
        super().__init__(binary, rundir)
        self.candidates = candidates
        self.function = ""

    def driver_args(self) -> list[str]:
        """The chosen function's name."""
        return [self.function]

    def start(self) -> None:
        """Probe the candidates in turn, keeping the first the driver survives calling with zero
        arguments; then run the driver on it."""
        exe = self.compile_driver()
        tried = []
        for name in self.candidates:
            probe = subprocess.Popen(
                [str(exe), str(self.binary), name],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                cwd=self.rundir,
                start_new_session=True,
            )
            time.sleep(0.3)  # thousands of calls
            alive = probe.poll() is None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(probe.pid, signal.SIGKILL)
            probe.wait()
            if probe.stdout is not None:
                probe.stdout.close()
            if alive:
                self.function = name
                break
            tried.append(f"{name}: exit {probe.returncode}")
        if not self.function:
            raise WorkloadFailed(
                f"no exported function of {self.binary.name}'s changed call graph survives "
                "calls with zero arguments",
                details=tried or ["no candidate"],
            )
        super().start()


def generic_candidates(library: Path, changed: list[str], pre_objects: list[Path]) -> list[str]:
    """Exported functions of ``library`` to call: the changed functions it exports, then
    exported functions whose pre code calls a changed function (one level of the call graph,
    from the pre build's objects)."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection
    from elftools.elf.sections import SymbolTableSection

    exported: set[str] = set()
    with open(library, "rb") as f:
        dynsym = ELFFile(f).get_section_by_name(".dynsym")
        if isinstance(dynsym, SymbolTableSection):
            exported = {
                s.name
                for s in dynsym.iter_symbols()
                if s["st_info"]["type"] == "STT_FUNC"
                and s["st_shndx"] != "SHN_UNDEF"
                and s["st_info"]["bind"] != "STB_LOCAL"
            }
    bases = {c.split(".")[0] for c in changed}
    out = [c for c in sorted(bases) if c in exported]
    for obj in pre_objects:
        try:
            with open(obj, "rb") as f:
                elf = ELFFile(f)
                symtab = elf.get_section_by_name(".symtab")
                if not isinstance(symtab, SymbolTableSection):
                    continue
                by_section: dict[int, list[str]] = {}
                for sym in symtab.iter_symbols():
                    if (
                        sym["st_info"]["type"] == "STT_FUNC"
                        and sym.name in exported
                        and isinstance(sym["st_shndx"], int)
                    ):
                        by_section.setdefault(sym["st_shndx"], []).append(sym.name)
                for sec in elf.iter_sections():
                    if not isinstance(sec, RelocationSection):
                        continue
                    callers = by_section.get(sec["sh_info"], [])
                    if not callers:
                        continue
                    targets = {
                        symtab.get_symbol(r["r_info_sym"]).name for r in sec.iter_relocations()
                    }
                    if targets & bases:
                        out.extend(c for c in callers if c not in out)
        except (OSError, ValueError):
            continue
    return out


class CurlWorkload(LibraryWorkload):
    """libcurl fetching from a local HTTP server, through a local SOCKS5 proxy for the
    reproducer."""

    driver_source = DRIVER_CURL
    has_reproducer = True

    def __init__(self, binary: Path, rundir: Path) -> None:
        super().__init__(binary, rundir)
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.socks = socket.socket()
        self.socks.bind(("127.0.0.1", 0))
        self.socks.listen(16)
        threading.Thread(target=self._socks_proxy, daemon=True).start()

    def _socks_proxy(self) -> None:
        """Enough of a SOCKS5 proxy (RFC 1928) for the handshake: accept 'no auth', then
        wait for the request and close."""
        while True:
            try:
                conn, _ = self.socks.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.settimeout(IO_TIMEOUT)
                conn.recv(64)
                conn.sendall(b"\x05\x00")
                conn.recv(1024)

    def driver_args(self) -> list[str]:
        """The local server's URL and the SOCKS5 proxy's, both on loopback."""
        port = self.http.server_address[1]
        return [f"http://127.0.0.1:{port}/", f"socks5h://127.0.0.1:{self.socks.getsockname()[1]}"]

    def stop(self) -> None:
        """Stop the driver, then the local HTTP server and proxy."""
        super().stop()
        self.http.shutdown()
        self.socks.close()


class Libxml2Workload(LibraryWorkload):
    """libxml2 resolving URIs through XML catalogs, with a self-referencing catalog as the
    reproducer."""

    driver_source = DRIVER_LIBXML2
    has_reproducer = True

    def driver_args(self) -> list[str]:
        """The looping catalog (the reproducer's) and an ordinary one, written into the run
        directory."""
        loop = self.rundir / "loop-catalog.xml"
        loop.write_text(LOOPING_CATALOG.format(path=loop))
        uris = self.rundir / "catalog.xml"
        uris.write_text(URI_CATALOG)
        return [str(loop), str(uris)]


class ExpatWorkload(LibraryWorkload):
    """libexpat parsing documents in a loop."""

    driver_source = DRIVER_EXPAT


WorkloadFactory = type[Workload]

# target name (executable or soname prefix) -> workload
WORKLOADS: dict[str, WorkloadFactory] = {
    "redis-server": RedisWorkload,
    "memcached": MemcachedWorkload,
    "nginx": NginxWorkload,
    "dnsmasq": DnsmasqWorkload,
    "sshd": SshdWorkload,
    "libcurl.so": CurlWorkload,
    "libcurl-gnutls.so": CurlWorkload,
    "libxml2.so": Libxml2Workload,
    "libexpat.so": ExpatWorkload,
}


def workload_for(target: str) -> WorkloadFactory | None:
    """The workload for a target executable or library (a soname with its version suffix falls
    back to its stem); None when the corpus has none for it."""
    if target in WORKLOADS:
        return WORKLOADS[target]
    if ".so" in target:
        return WORKLOADS.get(target[: target.index(".so") + 3])
    return None
