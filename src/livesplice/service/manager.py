"""The local manager page: what is applied where, what is available, apply and remove.

``livesplice agent --http 127.0.0.1:PORT`` serves it from the agent (loopback only). Reading
is open to whoever can reach the port on this machine; changing anything is not:

* every POST must carry the token in an ``X-Livesplice-Token`` header. The token is random,
  kept in the root-only store (``manager-token``), and printed by the agent in the page's
  address as ``#token=...`` -- a fragment, which browsers never send to servers or in
  ``Referer`` headers; the page's script sends it in the header;
* POST bodies must be ``application/json`` (an HTML form on another site cannot send that
  without a CORS preflight, which this server never answers), and no CORS header is ever
  sent, so another origin cannot read the answers either;
* the ``Host`` header must be the address the agent listens on (a DNS-rebinding page, whose
  host name merely resolves to 127.0.0.1, is refused).
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from livesplice.errors import LivespliceError
from livesplice.private import PrivateFileError, read_private, write_private
from livesplice.service.store import Store

PAGE = Path(__file__).with_name("manager.html")
BODY_MAX = 4096


def token(store: Store) -> str:
    """The manager's token (made once, root-only)."""
    path = store.root / "manager-token"
    try:
        value = read_private(path, 256).decode().strip()
        if len(value) >= 32:
            return value
    except (FileNotFoundError, PrivateFileError, UnicodeDecodeError):
        pass
    value = secrets.token_urlsafe(32)
    write_private(store.private_path("manager-token"), value.encode())
    return value


class Manager:
    """The local manager page's server: reads are open on loopback, actions need the token (see
    the module docstring for why each rule exists)."""

    def __init__(
        self,
        store: Store,
        host: str,
        port: int,
        repo: str = "",
        channel: str = "stable",
        trusted: list[Path] | None = None,
    ) -> None:
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise LivespliceError(f"the manager page listens on loopback only, not {host}")
        self.store, self.repo, self.channel, self.trusted = store, repo, channel, trusted
        self.token = token(store)
        self.lock = threading.Lock()  # one change at a time
        manager = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "livesplice"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _host_ok(self) -> bool:
                return self.headers.get("Host", "") in manager.hosts

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header(
                    "Content-Security-Policy",
                    "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                    "style-src 'unsafe-inline'; frame-ancestors 'none'",
                )
                self.end_headers()
                self.wfile.write(body)

            def _json(self, code: int, value: Any) -> None:
                self._send(code, json.dumps(value, indent=1).encode(), "application/json")

            def do_GET(self) -> None:
                if not self._host_ok():
                    return self._json(HTTPStatus.FORBIDDEN, {"error": "wrong Host"})
                if self.path in ("/", "/index.html"):
                    return self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
                if self.path == "/api/status":
                    return self._json(HTTPStatus.OK, manager.status(self.path))
                if self.path == "/api/available":
                    return self._json(HTTPStatus.OK, manager.status(self.path, available=True))
                return self._json(HTTPStatus.NOT_FOUND, {"error": "no such page"})

            def do_POST(self) -> None:
                if not self._host_ok():
                    return self._json(HTTPStatus.FORBIDDEN, {"error": "wrong Host"})
                given = self.headers.get("X-Livesplice-Token", "")
                if not hmac.compare_digest(given.encode(), manager.token.encode()):
                    return self._json(HTTPStatus.FORBIDDEN, {"error": "missing or wrong token"})
                if self.headers.get("Content-Type", "").split(";")[0] != "application/json":
                    return self._json(
                        HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "application/json only"}
                    )
                size = int(self.headers.get("Content-Length", "0") or 0)
                if not 0 <= size <= BODY_MAX:
                    return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "too large"})
                try:
                    body = json.loads(self.rfile.read(size) or b"{}")
                    if not isinstance(body, dict):
                        raise ValueError("not an object")
                except (ValueError, RecursionError):
                    return self._json(HTTPStatus.BAD_REQUEST, {"error": "bad JSON"})
                code, answer = manager.act(self.path, body)
                return self._json(code, answer)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.hosts = {f"{host}:{self.port}", f"localhost:{self.port}", f"127.0.0.1:{self.port}"}
        self.url = f"http://{host}:{self.port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> None:
        """Serve in a background thread (the agent's loop keeps the main one)."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def status(self, path: str, available: bool = False) -> dict[str, Any]:
        """The page's data: what is accepted and applied (and, asked, what the repository
        offers)."""
        from livesplice.service.client import open_repo, show

        repo = None
        error = ""
        if available and self.repo:
            try:
                repo = open_repo(self.repo, self.store, self.trusted)
            except LivespliceError as e:
                error = e.reason
        out = show(self.store, repo, self.channel)
        out["repo"] = self.repo
        out["repo_error"] = error
        return out

    def act(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Carry out a page action (upgrade, remove), one at a time; returns the HTTP status and
        answer."""
        from livesplice.service.client import remove, upgrade

        with self.lock:
            try:
                if path == "/api/remove":
                    uid = body.get("id")
                    if not isinstance(uid, str):
                        return HTTPStatus.BAD_REQUEST, {"error": "id missing"}
                    return HTTPStatus.OK, {"results": remove(self.store, [uid])}
                if path == "/api/upgrade":
                    if not self.repo:
                        return HTTPStatus.BAD_REQUEST, {"error": "no repository configured"}
                    rep = upgrade(
                        self.repo, store=self.store, channel=self.channel, trusted=self.trusted
                    )
                    return HTTPStatus.OK, {"results": rep.results}
            except LivespliceError as e:
                return HTTPStatus.CONFLICT, {"error": e.reason, "abort": e.abort}
        return HTTPStatus.NOT_FOUND, {"error": "no such action"}
