"""Reading and writing update files (deterministic gzip'd tar; see ``format``)."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from livesplice.errors import MalformedUpdate, UsageError
from livesplice.update.format import FORMAT, Manifest, manifest_from_dict

MANIFEST = "manifest.json"
PATCH = "patch"
SIGNATURE = "signature"
# Refuse absurd inputs before parsing them (a real update is kilobytes to a few megabytes).
MAX_UPDATE_BYTES = 256 * 1024 * 1024


@dataclass
class UpdateFile:
    manifest: Manifest
    patch: str
    signature: bytes | None
    # target-specific members (e.g. a kernel update's livepatch.ko), by member name
    extra: dict[str, bytes] = field(default_factory=dict)
    # every member but the signature, as stored (what the signature covers)
    members: dict[str, bytes] = field(default_factory=dict)

    def verify(
        self, trusted: list[Path] | None = None, *, allow_unsigned: bool = False
    ) -> str | None:
        """Check the signature (see ``signing``); the signer's key id, None if unsigned."""
        from livesplice.update.signing import verify

        return verify(self.members, self.signature, trusted, allow_unsigned=allow_unsigned)


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # determinism: same inputs -> byte-identical update
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(payload))


def encode_update(
    manifest: Manifest,
    patch: str,
    signature: bytes | None = None,
    extra: dict[str, bytes] | None = None,
) -> bytes:
    """The update file's bytes; a pure function of its inputs."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _tar_member(tar, MANIFEST, manifest.to_json().encode())
        _tar_member(tar, PATCH, patch.encode())
        for name in sorted(extra or {}):
            if name in (MANIFEST, PATCH, SIGNATURE):
                raise ValueError(f"reserved update member name {name!r}")
            _tar_member(tar, name, (extra or {})[name])
        if signature is not None:
            _tar_member(tar, SIGNATURE, signature)
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def unsigned_members(
    manifest: Manifest, patch: str, extra: dict[str, bytes] | None = None
) -> dict[str, bytes]:
    """The members a signature covers, exactly as they are stored."""
    return {MANIFEST: manifest.to_json().encode(), PATCH: patch.encode(), **(extra or {})}


def write_update(
    path: Path,
    manifest: Manifest,
    patch: str,
    extra: dict[str, bytes] | None = None,
    signing_key: Path | None = None,
) -> None:
    """Write atomically: a crash never leaves a half-written update under ``path``."""
    signature = None
    if signing_key is not None:
        from livesplice.update.signing import sign

        signature = sign(unsigned_members(manifest, patch, extra), signing_key)
    payload = encode_update(manifest, patch, signature=signature, extra=extra)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(
            f"cannot write the update: directory {directory} does not exist",
            advice="create the directory or pass another -o path",
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as e:
        raise UsageError(
            f"cannot write the update to {path}: {e.strerror}",
            advice="pass an -o path in a directory you can write to",
        ) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"cannot write the update to {path}: {e.strerror}") from e


def read_update(path: Path) -> UpdateFile:
    """Parse an update file; every malformation becomes :class:`MalformedUpdate`.

    The file is read ONCE, into memory, and everything (the signature check, apply) works
    on those bytes: reading the path again later would let a swapped file (or a FIFO that
    serves different content each time) get past the signature check.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UsageError(f"no such update file: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read the update {path}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file", advice="give the update file itself")
    if st.st_size > MAX_UPDATE_BYTES:
        raise MalformedUpdate(f"{path} is {st.st_size} bytes, too large to be a livesplice update")
    try:
        with open(path, "rb") as f:
            blob = f.read(MAX_UPDATE_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read the update {path}: {e.strerror}") from e
    if len(blob) > MAX_UPDATE_BYTES:
        raise MalformedUpdate(f"{path} grew past {MAX_UPDATE_BYTES} bytes while being read")
    return decode_update(blob, str(path))


def decode_update(blob: bytes, path: str = "update") -> UpdateFile:
    """Parse an update file's bytes (see :func:`read_update`)."""
    try:
        members: dict[str, bytes] = {}
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                f = tar.extractfile(info)
                if f is not None:
                    members[info.name] = f.read()
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as e:
        raise MalformedUpdate(
            f"{path} is not a livesplice update (not a readable gzip'd tar: {e})",
            advice="make updates with `livesplice create`; check the file was copied whole",
        ) from e
    if MANIFEST not in members:
        raise MalformedUpdate(f"{path} has no {MANIFEST}")
    try:
        raw = json.loads(members[MANIFEST])
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            fmt = raw.get("format") if isinstance(raw, dict) else None
            raise MalformedUpdate(
                f"{path}: unsupported update format {fmt!r} (this livesplice reads {FORMAT})"
            )
        manifest = manifest_from_dict(raw)
    except MalformedUpdate:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MalformedUpdate(f"{path}: the manifest is malformed ({type(e).__name__}: {e})") from e
    signature = members.pop(SIGNATURE, None)
    return UpdateFile(
        manifest=manifest,
        patch=members.get(PATCH, b"").decode(errors="replace"),
        signature=signature,
        extra={k: v for k, v in members.items() if k not in (MANIFEST, PATCH)},
        members=members,
    )
