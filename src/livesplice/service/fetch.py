"""Reading a repository: a local directory, ``file://``, or HTTP(S) through requests.

Every read is capped (an index, a signature, an update file each have a maximum size) and
HTTP reads time out; nothing read here is trusted until its signature or its digest (from a
verified index) says so. Update files are cached by SHA-256 in the store's cache directory,
so an agent re-applying at boot needs no network.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import unquote, urlparse

from livesplice.errors import UsageError

TIMEOUT = 20.0


class FetchError(UsageError):
    """The repository could not be read."""

    abort = "REPO_UNREACHABLE"


def _local(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(url)
    return None


def fetch(url: str, name: str, limit: int) -> bytes:
    """The bytes of ``name`` (a path relative to the repository at ``url``), at most
    ``limit`` of them.

    :raises FetchError: missing, unreachable, too large.
    """
    local = _local(url)
    if local is not None:
        path = local / name
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise FetchError(f"cannot read {path}: {e.strerror}") from None
    else:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https"):
            raise FetchError(f"unsupported repository URL {url!r} (file://, http://, https://)")
        import requests

        full = url.rstrip("/") + "/" + name
        try:
            with requests.get(full, timeout=TIMEOUT, stream=True) as r:
                if r.status_code != 200:
                    raise FetchError(f"{full}: HTTP {r.status_code}")
                chunks, size = [], 0
                for chunk in r.iter_content(1 << 16):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        break
                data = b"".join(chunks)
        except requests.RequestException as e:
            raise FetchError(f"cannot fetch {full}: {type(e).__name__}") from None
    if len(data) > limit:
        raise FetchError(f"{name} in {url} is larger than {limit} bytes")
    return data


def fetch_verified(url: str, name: str, sha256: str, size: int, cache: Path) -> Path:
    """An update file whose digest the verified index gives, from the cache or fetched.

    :raises FetchError: not the file the index describes.
    """
    from livesplice.private import write_private

    cached = cache / f"{sha256}.update"
    try:
        if hashlib.sha256(cached.read_bytes()).hexdigest() == sha256:
            return cached
    except OSError:
        pass
    data = fetch(url, name, size)
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        raise FetchError(
            f"{name} in {url} is not the file the signed index describes "
            f"(size {len(data)}, expected {size}; or a different digest)",
            advice="the repository or the connection changed it: do not use it",
        )
    write_private(cached, data)
    return cached
