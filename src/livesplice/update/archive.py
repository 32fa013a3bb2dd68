"""Reading and writing update files: authenticate first, then decompress, then parse.

Layout (format 2)::

    LIVESPLICE-UPDATE/2\n                 magic line (20 bytes)
    <u32 sig_len> <u32 0> <u64 payload_len>  little-endian sizes (16 bytes)
    signature                             sig_len bytes (0: unsigned), see ``signing``
    payload                               a deterministic gzip'd USTAR tar: manifest.json,
                                          patch, target-specific members (kernel.json, …)

The signature covers the payload's exact bytes, so :func:`load_update` checks it BEFORE it
decompresses or parses anything: an update from an untrusted source costs one SHA-256 over
at most ``MAX_UPDATE_BYTES`` before it is refused. Whatever is then decompressed (also
under ``--allow-unsigned``) is capped: the stream at ``MAX_PAYLOAD_BYTES``, the members in
number and name, the manifest by :func:`~livesplice.update.format.manifest_from_dict`.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from livesplice.errors import MalformedUpdate, UsageError
from livesplice.update.format import FORMAT, Manifest, manifest_from_dict

MAGIC = b"LIVESPLICE-UPDATE/2\n"
SIZES = struct.Struct("<IIQ")
MANIFEST = "manifest.json"
PATCH = "patch"
# Refuse absurd inputs before parsing them (a real update is kilobytes to a few megabytes).
MAX_UPDATE_BYTES = 64 * 1024 * 1024
MAX_PAYLOAD_BYTES = 128 * 1024 * 1024  # decompressed, whatever the compressed size
# ... and at most this many times the compressed size beyond 4 MiB (real updates inflate
# 15-25x, small ones more -- tar padding; a bomb 1000x)
MAX_INFLATION = 64
MAX_SIGNATURE_BYTES = 4096
MAX_MEMBERS = 64
MEMBER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class UpdateFile:
    """A read update: the manifest, the patch text, the signature and target-specific members,
    with the compressed payload exactly as the signature covers it."""

    manifest: Manifest
    patch: str
    signature: bytes | None
    # target-specific members (e.g. a kernel update's livepatch.ko), by member name
    extra: dict[str, bytes] = field(default_factory=dict)
    # the compressed payload exactly as read: what the signature covers
    payload: bytes = b""
    # the signer's key id once :func:`load_update` verified it (None: unsigned, allowed)
    signer: str | None = None

    def verify(
        self, trusted: list[Path] | None = None, *, allow_unsigned: bool = False
    ) -> str | None:
        """Check the signature (see ``signing``); the signer's key id, None if unsigned."""
        from livesplice.update.signing import verify

        return verify(self.payload, self.signature, trusted, allow_unsigned=allow_unsigned)


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # determinism: same inputs -> byte-identical update
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(payload))


def encode_payload(manifest: Manifest, patch: str, extra: dict[str, bytes] | None = None) -> bytes:
    """The signed part of an update: a deterministic gzip'd tar of its members."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        _tar_member(tar, MANIFEST, manifest.to_json().encode())
        _tar_member(tar, PATCH, patch.encode())
        for name in sorted(extra or {}):
            if name in (MANIFEST, PATCH) or not MEMBER_NAME.fullmatch(name):
                raise ValueError(f"reserved or invalid update member name {name!r}")
            _tar_member(tar, name, (extra or {})[name])
    co = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing, no name, mtime 0
    return co.compress(raw.getvalue()) + co.flush()


def encode_update(
    manifest: Manifest,
    patch: str,
    signature: bytes | None = None,
    extra: dict[str, bytes] | None = None,
    *,
    payload: bytes | None = None,
) -> bytes:
    """The update file's bytes; a pure function of its inputs."""
    body = encode_payload(manifest, patch, extra) if payload is None else payload
    sig = signature or b""
    return MAGIC + SIZES.pack(len(sig), 0, len(body)) + sig + body


def write_update(
    path: Path,
    manifest: Manifest,
    patch: str,
    extra: dict[str, bytes] | None = None,
    signing_key: Path | None = None,
) -> None:
    """Write atomically: a crash never leaves a half-written update under ``path``."""
    payload = encode_payload(manifest, patch, extra)
    signature = None
    if signing_key is not None:
        from livesplice.update.signing import sign

        signature = sign(payload, signing_key)
    data = encode_update(manifest, patch, signature, payload=payload)
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
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"cannot write the update to {path}: {e.strerror}") from e


def read_update_bytes(path: Path) -> bytes:
    """The file's bytes, read ONCE: everything (the signature check, apply) works on them;
    reading the path again would let a swapped file (or a FIFO that serves different
    content each time) get past the signature check."""
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
    return blob


@dataclass
class Envelope:
    """The outer layer of an update: parsed without decompressing anything."""

    signature: bytes | None
    payload: bytes


def open_envelope(blob: bytes, path: str = "update") -> Envelope:
    """Split an update file into signature and payload, without decompressing or parsing the
    payload (that happens only after authentication)."""
    if not blob.startswith(MAGIC):
        old = (
            " (format 1, a gzip'd tar: recreate it with this livesplice)"
            if blob[:2] == b"\x1f\x8b"
            else ""
        )
        raise MalformedUpdate(
            f"{path} is not a livesplice update{old}",
            advice="make updates with `livesplice create`; check the file was copied whole",
        )
    if len(blob) < len(MAGIC) + SIZES.size:
        raise MalformedUpdate(f"{path} is truncated (no size header)")
    sig_len, reserved, payload_len = SIZES.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + SIZES.size
    if reserved or sig_len > MAX_SIGNATURE_BYTES or start + sig_len + payload_len != len(blob):
        raise MalformedUpdate(
            f"{path}: the size header does not match the file (signature {sig_len}, payload "
            f"{payload_len}, file {len(blob)} bytes)",
            advice="check the file was copied whole",
        )
    sig = blob[start : start + sig_len] or None
    return Envelope(sig, blob[start + sig_len :])


def load_update(
    path: Path, trusted: list[Path] | None = None, *, allow_unsigned: bool = False
) -> UpdateFile:
    """Read, authenticate, then parse: what apply uses. The signer is in ``.signer``.

    :raises SignatureError: before anything was decompressed.
    :raises MalformedUpdate: a malformed file, also when allowed unsigned.
    """
    from livesplice.update.signing import verify

    env = open_envelope(read_update_bytes(path), str(path))
    signer = verify(env.payload, env.signature, trusted, allow_unsigned=allow_unsigned)
    update = decode_envelope(env, str(path))
    update.signer = signer
    return update


def read_update(path: Path) -> UpdateFile:
    """Parse an update file WITHOUT checking its signature (inspect, tools, tests); every
    malformation becomes :class:`MalformedUpdate`. apply uses :func:`load_update`."""
    return decode_update(read_update_bytes(path), str(path))


def decode_update(blob: bytes, path: str = "update") -> UpdateFile:
    """Parse an update file's bytes (no signature check; see :func:`load_update`)."""
    return decode_envelope(open_envelope(blob, path), path)


def _inflate(payload: bytes, path: str) -> bytes:
    """gunzip with a cap on the output (``MAX_INFLATION`` times the input, at most
    ``MAX_PAYLOAD_BYTES``): a bomb is refused early, never expanded whole."""
    cap = min(MAX_PAYLOAD_BYTES, max(4 << 20, MAX_INFLATION * len(payload)))
    d = zlib.decompressobj(31)
    out = bytearray()
    data = payload
    try:
        while not d.eof:
            chunk = d.decompress(data, min(cap + 1 - len(out), 1 << 20))
            out += chunk
            if len(out) > cap:
                raise MalformedUpdate(
                    f"{path}: the payload inflates past {cap} bytes "
                    f"({len(payload)} compressed): not a livesplice update"
                )
            data = d.unconsumed_tail
            if not chunk and not data:
                break  # input exhausted before the end of the stream
        if not d.eof or d.unused_data:
            raise MalformedUpdate(f"{path}: the payload is not one complete gzip stream")
    except zlib.error as e:
        raise MalformedUpdate(f"{path}: the payload is not gzip data ({e})") from None
    return bytes(out)


def _members(raw: bytes, path: str) -> dict[str, bytes]:
    """The tar's regular members; anything else (links, devices, pax or GNU extensions,
    odd names, duplicates, too many) makes the update malformed."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:", format=tarfile.USTAR_FORMAT) as tar:
            for n, info in enumerate(tar):
                if n >= MAX_MEMBERS:
                    raise MalformedUpdate(f"{path}: more than {MAX_MEMBERS} members")
                if not info.isreg() or info.pax_headers or not MEMBER_NAME.fullmatch(info.name):
                    raise MalformedUpdate(
                        f"{path}: unexpected member {info.name!r:.80} (type {info.type!r})"
                    )
                if info.name in members:
                    raise MalformedUpdate(f"{path}: member {info.name!r} appears twice")
                f = tar.extractfile(info)
                data = f.read(info.size) if f is not None else b""
                if len(data) != info.size:
                    raise MalformedUpdate(f"{path}: member {info.name!r} is truncated")
                members[info.name] = data
    except (tarfile.TarError, EOFError, ValueError, OverflowError) as e:
        raise MalformedUpdate(f"{path}: the payload is not a readable tar ({e})") from e
    return members


def decode_envelope(env: Envelope, path: str = "update") -> UpdateFile:
    """Decompress (capped) and parse (strictly) an update's payload."""
    members = _members(_inflate(env.payload, path), path)
    if MANIFEST not in members:
        raise MalformedUpdate(f"{path} has no {MANIFEST}")
    try:
        raw = json.loads(members[MANIFEST])
    except (ValueError, RecursionError) as e:
        raise MalformedUpdate(f"{path}: the manifest is not JSON ({type(e).__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        fmt = raw.get("format") if isinstance(raw, dict) else None
        raise MalformedUpdate(
            f"{path}: unsupported update format {fmt!r:.60} (this livesplice reads {FORMAT})"
        )
    try:
        manifest = manifest_from_dict(raw)
    except ValueError as e:
        raise MalformedUpdate(
            f"{path}: the manifest is malformed: {e}",
            advice="make updates with `livesplice create`",
        ) from None
    try:
        patch = members.get(PATCH, b"").decode()
    except UnicodeDecodeError:
        raise MalformedUpdate(f"{path}: the patch member is not UTF-8 text") from None
    return UpdateFile(
        manifest=manifest,
        patch=patch,
        signature=env.signature,
        extra={k: v for k, v in members.items() if k not in (MANIFEST, PATCH)},
        payload=env.payload,
    )
