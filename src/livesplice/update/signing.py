"""Signed updates: who made this update, and is it the update they made?

An update file carries a signature beside its payload (see :mod:`livesplice.update.archive`):
an Ed25519 signature over a *statement* naming the SHA-256 of the payload's exact bytes::

    livesplice-signature/2
    payload sha256 <hex>

so nothing in the update (code, patch text, a kernel module) can change without breaking the
signature, and the check needs no decompression or parsing of what it protects: an update
from an untrusted source is refused before any of it is unpacked. The signature is JSON:
``{"algorithm": "ed25519", "key_id": ..., "signature": ...}``
where ``key_id`` is the first 16 hex digits of the SHA-256 of the raw public key.

``apply`` trusts the public keys in a trust directory (``/etc/livesplice/trusted-keys`` or
``$LIVESPLICE_TRUST_DIR``, one ``*.pub`` PEM file per key) or given with ``--trusted-key``;
an unsigned update, an unknown key or a bad signature is refused unless the operator says
``--allow-unsigned`` (which still refuses a *bad* signature).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from livesplice.errors import LivespliceError, UsageError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

STATEMENT_HEADER = "livesplice-signature/2"
DEFAULT_TRUST_DIR = Path("/etc/livesplice/trusted-keys")


class SignatureError(LivespliceError):
    """The update is unsigned, signed by a key nobody trusts, or its signature is bad."""

    code = UsageError.code
    abort = "BAD_SIGNATURE"


# what a signature is for, named in the statement: a signature made for one kind of document
# (an update, a repository index) is never valid for another
HEADERS = {"update": STATEMENT_HEADER, "index": "livesplice-index-signature/1"}


def statement(payload: bytes, kind: str = "update") -> bytes:
    """What is signed: the digest of the payload, under a versioned header for its kind."""
    return f"{HEADERS[kind]}\npayload sha256 {hashlib.sha256(payload).hexdigest()}\n".encode()


def _crypto() -> tuple[ModuleType, ModuleType]:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise UsageError("signing needs the 'cryptography' package") from e
    return serialization, ed25519


def key_id(public_raw: bytes) -> str:
    """The short id of a public key (sha256 of its raw bytes): how signatures and trusted keys
    name it."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass
class KeyPair:
    """A new signing key: PEM of both halves and the key's id."""

    private_pem: bytes
    public_pem: bytes
    key_id: str


def generate_key() -> KeyPair:
    """A new Ed25519 key pair (``livesplice keygen``)."""
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = key.public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair(priv, pem, key_id(raw))


def sign(payload: bytes, private_key: Path, kind: str = "update") -> bytes:
    """The signature of this payload, signed with the PEM key at ``private_key``."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    except FileNotFoundError:
        raise UsageError(f"signing key {private_key} does not exist") from None
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(f"{private_key} is not a usable private key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"{private_key} is not an Ed25519 key (make one with `livesplice keygen`)")
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = key.sign(statement(payload, kind))
    body = {"algorithm": "ed25519", "key_id": key_id(raw), "signature": sig.hex()}
    return (json.dumps(body, sort_keys=True) + "\n").encode()


def load_public_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    """key_id -> public key object, from PEM files and directories of ``*.pub`` files."""
    keys: dict[str, Ed25519PublicKey] = {}
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(p.glob("*.pub")))
        elif p.exists():
            files.append(p)
        else:
            raise UsageError(f"trusted key {p} does not exist")
    if not files:
        return keys
    serialization, ed25519 = _crypto()
    for f in files:
        try:
            pub = serialization.load_pem_public_key(f.read_bytes())
        except (ValueError, OSError) as e:
            raise UsageError(f"{f} is not a PEM public key ({e})") from None
        if not isinstance(pub, ed25519.Ed25519PublicKey):
            raise UsageError(f"{f} is not an Ed25519 public key")
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        keys[key_id(raw)] = pub
    return keys


def trust_paths(extra: list[Path] | None) -> list[Path]:
    """Where trusted public keys are looked for: the ones given, then LIVESPLICE_TRUST_DIR or
    /etc/livesplice/trusted-keys when it exists."""
    env = os.environ.get("LIVESPLICE_TRUST_DIR")
    base = Path(env) if env else DEFAULT_TRUST_DIR
    out = list(extra or [])
    if base.is_dir():
        out.append(base)
    return out


def verify(
    payload: bytes,
    signature: bytes | None,
    trusted: list[Path] | None = None,
    *,
    allow_unsigned: bool = False,
    kind: str = "update",
) -> str | None:
    """Check the signature; return the signer's key id (None: unsigned and allowed).

    :raises SignatureError: unsigned (unless allowed), unknown key, or a bad signature.
    """
    if signature is None:
        if allow_unsigned:
            return None
        raise SignatureError(
            f"the {kind} is not signed",
            advice="sign it with `livesplice create --sign KEY` (keys: `livesplice keygen`), "
            "or pass --allow-unsigned if you built it yourself and trust it",
        )
    try:
        body = json.loads(signature)
        kid, sig = str(body["key_id"]), bytes.fromhex(body["signature"])
        if len(sig) != 64 or not re.fullmatch(r"[0-9a-f]{16}", kid):
            raise ValueError("not an Ed25519 signature with a key id")
        if body.get("algorithm") != "ed25519":
            raise ValueError(f"unknown algorithm {body.get('algorithm')!r}")
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise SignatureError(f"the {kind}'s signature is malformed ({e!s:.100})") from None
    keys = load_public_keys(trust_paths(trusted))
    pub = keys.get(kid)
    if pub is None:
        if allow_unsigned:
            return None
        where = ", ".join(str(p) for p in trust_paths(trusted)) or "no trust directory"
        raise SignatureError(
            f"the {kind} is signed by key {kid}, which is not trusted here",
            details=[f"trusted keys looked up in: {where}"],
            advice="install the signer's public key (*.pub) in the trust directory, or pass "
            "--trusted-key FILE",
        )
    from cryptography.exceptions import InvalidSignature

    try:
        pub.verify(sig, statement(payload, kind))
    except InvalidSignature:
        raise SignatureError(
            f"BAD signature by key {kid}: the {kind} was modified after it was signed",
            advice="do not apply it; get the update again from its source",
        ) from None
    return kid
