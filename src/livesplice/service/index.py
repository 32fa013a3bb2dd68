"""A repository of updates: static files and a signed index, served by anything.

Layout (any web server, or a directory read through ``file://``)::

    index.json        what the repository offers (below)
    index.json.sig    Ed25519 signature over index.json's exact bytes, made for an *index*
                      (its own statement header: an update's signature is never an index's)
    updates/ID.update the update files (each signed in its own right)
    keys/KEYID.pub    the repository's public key, for operators to install

``index.json``::

    {"format": "livesplice-repo/1", "serial": 7, "updates": [ENTRY, ...]}

``serial`` grows with every change; a client refuses an index older than one it has seen
(a replayed old index would hide newer fixes). An ENTRY names an update by what it patches
-- its targets' GNU build-ids (a kernel: its release and build-id) -- with the file's
SHA-256 and size, CVE ids, a description, a channel, an effective-version label, its order
(stacked updates apply in order), what it requires and what it supersedes (a cumulative
update replaces those).

The client checks the signature before it parses a byte of the index (with the same trusted
keys as ``apply``), caps its size, decodes it strictly, and checks each downloaded update
file's digest against the index before it checks the file's own signature.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from livesplice.errors import MalformedUpdate, UsageError
from livesplice.update.format import check_update_id

FORMAT = "livesplice-repo/1"
INDEX = "index.json"
SIGNATURE = "index.json.sig"
INDEX_MAX = 8 << 20
MAX_ENTRIES = 10000
_HEX = re.compile(r"[0-9a-f]*")
_CVE = re.compile(r"CVE-\d{4}-\d{4,7}")
_CHANNEL = re.compile(r"[a-z][a-z0-9-]{0,31}")
_LABEL = re.compile(r"[\x20-\x7e]{0,128}")


class BadIndex(MalformedUpdate):
    """The repository index is malformed (after its signature was found valid)."""

    abort = "BAD_INDEX"


@dataclass(frozen=True)
class IndexTarget:
    """One target of an indexed update: what a machine compares with what it runs (build-ids, or
    the kernel release) to tell whether the update is for it."""

    name: str
    kind: Literal["executable", "shared_library", "kernel", "kernel_module"]
    build_id: str  # hex, "" if the update recorded none (the pre build livesplice made)
    release: str = ""  # kernel targets: the kernel release (uname -r)
    # build-ids of the binaries the vendor ships for this target (repo add --binary): what
    # machines actually run, usually built otherwise than livesplice's pre build
    shipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class IndexEntry:
    """One update in a repository's index: where its file is, its digest and size (checked before
    the file is even parsed), and which targets it is for."""

    id: str
    file: str  # path relative to the repository
    sha256: str
    size: int
    kind: Literal["process", "kernel"]
    targets: tuple[IndexTarget, ...]
    order: int
    description: str = ""
    channel: str = "stable"
    effective_version: str = ""
    cves: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    supersedes: tuple[str, ...] = ()
    added: float = 0.0

    @property
    def build_ids(self) -> tuple[str, ...]:
        """Identities a machine matches against: ``release:build-id`` for kernel targets, every
        known build-id (livesplice's and the shipped binaries') for the others."""
        out: list[str] = []
        for t in self.targets:
            if t.kind in ("kernel", "kernel_module"):
                out.append(f"{t.release}:{t.build_id}")
            else:
                out.extend(b for b in (t.build_id, *t.shipped) if b)
        return tuple(dict.fromkeys(out))


@dataclass
class Index:
    """A repository's index: its serial (a machine refuses a lower one: no rollback) and its
    updates."""

    serial: int = 0
    updates: list[IndexEntry] = field(default_factory=list)
    format: str = FORMAT

    def to_bytes(self) -> bytes:
        """The index as written to the repository: sorted keys, so the same index is the same
        bytes (and the same signature)."""
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()

    def entry(self, update_id: str) -> IndexEntry | None:
        """The entry of ``update_id`` (None: not in this index)."""
        return next((e for e in self.updates if e.id == update_id), None)

    def in_channel(self, channel: str) -> list[IndexEntry]:
        """Entries a machine following ``channel`` gets: stable gets stable; testing gets
        testing and stable."""
        wanted = {"stable"} if channel == "stable" else {channel, "stable"}
        return sorted(
            (e for e in self.updates if e.channel in wanted), key=lambda e: (e.order, e.id)
        )


# ------------------------------------------------------------------ strict decoding


def _str(
    raw: dict[str, Any],
    key: str,
    pattern: re.Pattern[str] | None = None,
    default: str | None = None,
    limit: int = 4096,
) -> str:
    v = raw.get(key, default)
    if not isinstance(v, str) or len(v) > limit or (pattern and not pattern.fullmatch(v)):
        raise BadIndex(f"index: {key} is not a valid string")
    return v


def _int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    v = raw.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 62:
        raise BadIndex(f"index: {key} is not a non-negative integer")
    return v


def _strs(raw: dict[str, Any], key: str, check: Callable[[str], object]) -> tuple[str, ...]:
    v = raw.get(key, [])
    if not isinstance(v, list) or len(v) > 256 or not all(isinstance(x, str) for x in v):
        raise BadIndex(f"index: {key} is not a list of strings")
    for x in v:
        check(x)
    return tuple(v)


def _fields(raw: Any, known: set[str], what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadIndex(f"index: {what} is not an object")
    unknown = set(raw) - known
    if unknown:
        raise BadIndex(f"index: {what} has unknown fields {sorted(unknown)[:5]}")
    return raw


def _id(value: str) -> None:
    try:
        check_update_id(value)
    except UsageError as e:
        raise BadIndex(f"index: {e.reason}") from None


def _build_id(value: str) -> None:
    if not (_HEX.fullmatch(value) and 8 <= len(value) <= 128):
        raise BadIndex(f"index: {value[:40]!r} is not a build-id")


def _cve(value: str) -> None:
    if not _CVE.fullmatch(value):
        raise BadIndex(f"index: {value[:40]!r} is not a CVE id")


def _entry(raw: Any) -> IndexEntry:
    raw = _fields(raw, set(IndexEntry.__dataclass_fields__), "an update entry")
    uid = _str(raw, "id")
    _id(uid)
    targets_raw = raw.get("targets")
    if not isinstance(targets_raw, list) or not 0 < len(targets_raw) <= 64:
        raise BadIndex(f"index: update {uid}: targets is not a list of 1..64")
    targets = []
    for t in targets_raw:
        t = _fields(t, set(IndexTarget.__dataclass_fields__), "a target")
        kind = _str(t, "kind")
        if kind not in ("executable", "shared_library", "kernel", "kernel_module"):
            raise BadIndex(f"index: update {uid}: unknown target kind")
        targets.append(
            IndexTarget(
                name=_str(t, "name", limit=256),
                kind=kind,  # type: ignore[arg-type]
                build_id=_str(t, "build_id", _HEX, limit=128),
                release=_str(t, "release", _LABEL, default=""),
                shipped=_strs(t, "shipped", _build_id),
            )
        )
    kind = _str(raw, "kind")
    if kind not in ("process", "kernel"):
        raise BadIndex(f"index: update {uid}: kind is not process or kernel")
    file = _str(raw, "file", limit=256)
    if file != f"updates/{uid}.update":
        raise BadIndex(f"index: update {uid}: file must be updates/{uid}.update")
    sha = _str(raw, "sha256", _HEX, limit=64)
    if len(sha) != 64:
        raise BadIndex(f"index: update {uid}: sha256 is not a SHA-256")
    added = raw.get("added", 0.0)
    if not isinstance(added, (int, float)) or isinstance(added, bool):
        raise BadIndex(f"index: update {uid}: added is not a number")
    return IndexEntry(
        id=uid,
        file=file,
        sha256=sha,
        size=_int(raw, "size"),
        kind=kind,  # type: ignore[arg-type]
        targets=tuple(targets),
        order=_int(raw, "order"),
        description=_str(raw, "description", _LABEL, default=""),
        channel=_str(raw, "channel", _CHANNEL, default="stable"),
        effective_version=_str(raw, "effective_version", _LABEL, default=""),
        cves=_strs(raw, "cves", _cve),
        requires=_strs(raw, "requires", _id),
        supersedes=_strs(raw, "supersedes", _id),
        added=float(added),
    )


def decode_index(data: bytes) -> Index:
    """Parse an index whose signature was already checked."""
    if len(data) > INDEX_MAX:
        raise BadIndex(f"index: larger than {INDEX_MAX} bytes")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise BadIndex(f"index: not JSON ({type(e).__name__})") from None
    raw = _fields(raw, {"format", "serial", "updates"}, "the index")
    if raw.get("format") != FORMAT:
        raise BadIndex(f"index: format is not {FORMAT}")
    updates = raw.get("updates")
    if not isinstance(updates, list) or len(updates) > MAX_ENTRIES:
        raise BadIndex("index: updates is not a list")
    entries = [_entry(e) for e in updates]
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise BadIndex("index: an update id is listed twice")
    for entry in entries:
        for other in (*entry.requires, *entry.supersedes):
            if other not in ids or other == entry.id:
                raise BadIndex(
                    f"index: update {entry.id} refers to {other}, which it does not list"
                )
    return Index(serial=_int(raw, "serial"), updates=entries)


def verify_index(data: bytes, signature: bytes | None, trusted: list[Path] | None) -> str:
    """Check the index signature before anything else; return the signer's key id."""
    from livesplice.update.signing import verify

    if len(data) > INDEX_MAX:
        raise BadIndex(f"index: larger than {INDEX_MAX} bytes")
    kid = verify(data, signature, trusted, kind="index")
    assert kid is not None  # allow_unsigned is never passed for an index
    return kid


# ------------------------------------------------------------------ writing (repo init/add)


def _key_pub(key: Path) -> tuple[str, bytes]:
    from cryptography.hazmat.primitives import serialization

    from livesplice.update.signing import key_id

    try:
        priv = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{key} is not a usable private key ({e})") from None
    pub = priv.public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key_id(raw), pem


def write_index(repo: Path, index: Index, key: Path) -> None:
    """Sign and write the index: the new signature first, then the index renamed into place.
    A reader between the two sees a pair that does not verify (and refuses it), never a
    half-written index."""
    from livesplice.update.signing import sign

    data = index.to_bytes()
    sig = sign(data, key, kind="index")
    tmp = repo / f".{INDEX}.tmp"
    tmp.write_bytes(data)
    (repo / SIGNATURE).write_bytes(sig)  # a reader between the two writes sees a bad pair
    tmp.rename(repo / INDEX)


def read_local_index(repo: Path, key: Path) -> Index:
    """The repository's own index, for repo add (verified with the repository's key)."""
    kid, _ = _key_pub(key)
    pub = repo / "keys" / f"{kid}.pub"
    if not pub.exists():
        raise UsageError(
            f"{repo} is not a repository of key {kid}",
            advice=f"make one with `livesplice repo init {repo} --key {key}`",
        )
    data = (repo / INDEX).read_bytes()
    sig = (repo / SIGNATURE).read_bytes()
    verify_index(data, sig, [pub])
    return decode_index(data)


def repo_init(repo: Path, key: Path) -> str:
    """Make an empty repository signed by ``key``, with its public key published in ``keys/``;
    returns the key id."""
    kid, pem = _key_pub(key)
    if (repo / INDEX).exists():
        raise UsageError(f"{repo} already holds a repository index")
    (repo / "updates").mkdir(parents=True, exist_ok=True)
    (repo / "keys").mkdir(exist_ok=True)
    (repo / "keys" / f"{kid}.pub").write_bytes(pem)
    write_index(repo, Index(serial=1), key)
    return kid


def repo_add(
    repo: Path,
    key: Path,
    update_path: Path,
    *,
    channel: str = "stable",
    cves: list[str] | None = None,
    effective_version: str = "",
    supersedes: list[str] | None = None,
    requires: list[str] | None = None,
    binaries: list[Path] | None = None,
) -> IndexEntry:
    """Add (or replace) one update; it must carry a valid signature by a key the
    repository's machines trust -- here: the repository's own key.

    ``binaries``: the files the vendor ships for the update's targets (matched to a target
    by file name or soname); their build-ids are what machines will be running. The
    update's own ``build_id`` is that of livesplice's pre build, which a deployed binary
    built by other means does not share.
    """
    from livesplice.process.image import gnu_build_id
    from livesplice.update.archive import load_update

    kid, _ = _key_pub(key)
    index = read_local_index(repo, key)
    update = load_update(update_path, [repo / "keys" / f"{kid}.pub"])
    m = update.manifest
    kernel = any(t.kind in ("kernel", "kernel_module") for t in m.targets)
    release = ""
    if kernel:
        from livesplice.kernel.package import read_kernel_members

        _, kjson = read_kernel_members(update, update_path)
        release = str(kjson.get("release", ""))
    blob = update_path.read_bytes()
    if channel and not _CHANNEL.fullmatch(channel):
        raise UsageError(f"bad channel name {channel!r} (a-z, 0-9, -)")
    for c in cves or []:
        if not _CVE.fullmatch(c):
            raise UsageError(f"{c!r} is not a CVE id (CVE-YYYY-NNNN)")
    if not _LABEL.fullmatch(effective_version):
        raise UsageError("the effective version must be printable ASCII, at most 128 characters")
    for other in [*(supersedes or []), *(requires or [])]:
        if index.entry(other) is None:
            raise UsageError(f"update {other} is not in the repository")
    # the binaries the update was verified against when it was made (signed with it), then
    # those given here: each run-pre matched now unless the update already vouches for it
    shipped: dict[str, list[str]] = {t.name: [v.build_id for v in t.verified] for t in m.targets}
    by_name = {t.name: t for t in m.targets}
    programs = [t.name for t in m.targets if t.kind == "executable"]
    for b in binaries or []:
        name = b.name if b.name in by_name else _soname(b)
        if name not in by_name and len(programs) == 1:
            name = programs[0]  # a program shipped under another name: its code decides
        if name not in by_name:
            raise UsageError(f"{b} is none of the update's targets ({', '.join(sorted(by_name))})")
        bid = gnu_build_id(str(b))
        if not bid:
            raise UsageError(f"{b} has no GNU build-id: machines could not be matched to it")
        target = by_name[name]
        # a stacked update's pre code is the required update's post code: not in the file
        if not kernel and not requires and bid not in target.build_ids:
            from livesplice.process.match import match_file

            match_file(str(b), target, compiler=m.compiler)  # NoMatch: it does not fit
        if bid not in shipped[name]:
            shipped[name].append(bid)
    old = index.entry(m.id)
    order = old.order if old else max((e.order for e in index.updates), default=0) + 1
    entry = IndexEntry(
        id=m.id,
        file=f"updates/{m.id}.update",
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        kind="kernel" if kernel else "process",
        targets=tuple(
            IndexTarget(
                t.name,
                t.kind,
                t.build_id,
                release if kernel else "",
                tuple(shipped.get(t.name, ())),
            )
            for t in m.targets
        ),
        order=order,
        description=m.description[:128] if _LABEL.fullmatch(m.description[:128]) else "",
        channel=channel,
        effective_version=effective_version,
        cves=tuple(cves or ()),
        requires=tuple(requires or ()),
        supersedes=tuple(supersedes or ()),
        added=time.time(),
    )
    (repo / "updates" / f"{m.id}.update").write_bytes(blob)
    index.updates = [e for e in index.updates if e.id != m.id] + [entry]
    index.serial += 1
    write_index(repo, index, key)
    return entry


def _soname(path: Path) -> str:
    from elftools.common.exceptions import ELFError
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            for sec in ELFFile(f).iter_sections():
                if isinstance(sec, DynamicSection):
                    for tag in sec.iter_tags("DT_SONAME"):
                        return str(getattr(tag, "soname", ""))
    except (OSError, ELFError):
        pass
    return ""
