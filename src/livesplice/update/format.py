"""The update file: the contract between ``create`` (build/diff/package) and ``apply``.

An update file (see :mod:`livesplice.update.archive`) is a small envelope -- magic, sizes,
an Ed25519 signature -- around a deterministic gzip-compressed tar archive::

    manifest.json      everything apply needs (this module's :class:`Manifest`)
    patch              the patch text, verbatim
    <extra members>    target-specific (a kernel update's module and kernel.json)

The manifest is decoded strictly (:func:`manifest_from_dict`): every field against the
dataclasses' own type hints, then ranges and relations (one target once, sections inside
their sizes, hex that is hex, the one update-id rule of :func:`check_update_id`).

Code and data travel inside the manifest as hex strings, together with their relocations, so
``apply`` never needs the original object files.

Symbol keys
-----------
Relocations name what they point at by a *symbol key*, unique within one target:

* a global symbol: its name (``"printf"``, ``"table"``);
* a local symbol (static function or variable, section symbol, ``.LC0``):
  ``"<unit>:<name>"`` where unit is the source path relative to the tree
  (``"src/net.c:.bss.counter"``, ``"src/net.c:.LC0"``, ``"src/net.c:helper"``).

The assembler turns most references to local symbols into *section symbol + addend*; with
``-ffunction-sections -fdata-sections`` every function and object has its own section, so a
section key (``"src/net.c:.text.helper"``) names exactly one function or object. Apply learns
the running address of a section key the same way as of a symbol key: from the relocation
fields of matched pre code (value = S + A - P for PC-relative types, so S = value - A + P).

Symbol keys always use the *pre* object's names for things that exist in both builds (the
diff correlates renamed static locals such as ``counter.1`` -> ``counter.2``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FORMAT = "livesplice-update/1"

HOOK_KINDS = (
    "pre_apply",
    "apply",
    "post_apply",
    "fail_apply",
    "pre_reverse",
    "reverse",
    "post_reverse",
    "fail_reverse",
)

SectionRole = Literal["pre", "replacement", "new_function", "new_data", "copied_rodata", "hook"]


@dataclass(frozen=True)
class Reloc:
    """One relocation inside a shipped section, as the ELF object had it."""

    offset: int  # offset of the relocated field within the section
    type: str  # ABI name, e.g. "R_X86_64_PLT32"
    symbol: str  # symbol key (see module docstring)
    addend: int


PatchSiteKind = Literal["paravirt", "alternative"]


@dataclass
class PatchSite:
    """A place in ``pre`` code that the kernel rewrites at boot (or when a module loads),
    read from the pre object's patch-site tables: run-pre matching accepts there exactly what
    the kernel may have written (livesplice.kernel.patchsites) and compares the rest as usual.

    * ``paravirt``: a ``.parainstructions`` entry (``call *pv_ops+8*pv_type(%rip)``, which
      apply_paravirt turns into a direct call of the slot's function or nops);
    * ``alternative``: an ``.altinstructions`` entry: the original instructions or, when the
      CPU ``feature`` (word*32+bit, 0x8000 = "when absent") says so, ``replacement`` padded
      with nops.

    Updates made before this field existed have no sites: their sections match as before.
    """

    kind: PatchSiteKind
    offset: int  # within the section
    length: int  # bytes the kernel may rewrite
    pv_type: int = 0  # paravirt: slot of struct paravirt_patch_template
    feature: int = 0  # alternative: X86_FEATURE_* number, | 0x8000 for ALT_NOT
    replacement: str = ""  # alternative: hex bytes of the replacement
    relocs: list[Reloc] = field(default_factory=list)  # alternative: of the replacement


@dataclass
class Section:
    """A piece of code or data that travels in the update.

    ``role`` says what apply does with it:

    * ``pre``: the unpatched code of a function, used ONLY for run-pre matching: found in the
      running code, compared byte for byte except relocation fields, and its relocation fields
      read to learn running addresses. Never loaded.
    * ``replacement``: post code of a changed function; the running function with the same
      ``key`` gets a jump to it.
    * ``new_function``: post code of a function that did not exist before.
    * ``new_data``: a data object that did not exist before (loaded, writable unless
      ``readonly``).
    * ``copied_rodata``: read-only data the post code needs (string literals, jump tables,
      constants); loaded as a private copy.
    * ``hook``: post code of a hook function (see ``livesplice.h``); loaded, called by apply.
    """

    key: str  # symbol key of the section itself, e.g. "src/a.c:.text.work"
    role: SectionRole
    name: str  # the function or object name ("work", "counter"), or the section name
    unit: str  # source path relative to the tree
    align: int
    size: int
    data: str  # hex; empty for NOBITS (bss-like) sections
    relocs: list[Reloc] = field(default_factory=list)
    readonly: bool = True
    executable: bool = False
    # symbol keys defined by this section with their offsets (a section may define several
    # symbols, e.g. the function and its local labels, or strings in .rodata.str1.1)
    symbols: dict[str, int] = field(default_factory=dict)
    # for role="replacement": the key of the pre section it replaces (same function)
    replaces: str | None = None
    # for role="hook": which hook it is
    hook: str | None = None
    # for role="pre" of a kernel target: where the kernel rewrites this code at boot
    sites: list[PatchSite] = field(default_factory=list)

    @property
    def bytes(self) -> bytes:
        """The section's contents (zeros for .bss-like sections, which carry only a size)."""
        return bytes.fromhex(self.data) if self.data else b"\0" * self.size


@dataclass
class SymbolInfo:
    """What the update knows about a symbol key referenced by a relocation."""

    key: str
    name: str
    binding: Literal["local", "global", "weak"]
    # "func" / "object" / "tls" / "section" / "notype"
    kind: str
    # "defined": defined in a compiled unit of this target (pre); "undefined": comes from
    # another object or library (resolved by the dynamic linker in the running process)
    defined: bool
    unit: str | None = None


@dataclass
class Verified:
    """A shipped binary this target's pre code was run-pre matched against when the update
    was created (``create --verify-against``): a Debian archive build of the same source has
    another build-id than livesplice's pre build, and may run under another name (Debian's
    redis-server is a symlink to redis-check-rdb). apply takes an image with one of these
    build-ids for the target, whatever its path."""

    file: str  # the file's name where it was found ("usr/bin/redis-check-rdb")
    build_id: str  # its GNU build-id (hex)
    origin: str = ""  # what it came from ("redis-server_5%3a7.0.15-1~deb12u7_amd64.deb")
    functions: int = 0  # pre sections matched in it


@dataclass
class Target:
    """One executable or shared library that the update changes."""

    name: str  # file name of the linked executable or library ("server", "libfoo.so.1")
    kind: Literal["executable", "shared_library", "kernel", "kernel_module"]
    build_id: str  # GNU build-id (hex) of the pre link, "" if none
    changed_functions: list[str]
    new_functions: list[str]
    new_data: list[str]
    sections: list[Section]
    symbols: dict[str, SymbolInfo]
    units: list[str] = field(default_factory=list)  # changed units (source paths)
    verified: list[Verified] = field(default_factory=list)

    @property
    def build_ids(self) -> set[str]:
        """Every build-id that identifies this target: the pre build's, and those of the
        shipped binaries its pre code was verified against."""
        return {b for b in (self.build_id, *(v.build_id for v in self.verified)) if b}


@dataclass
class Hook:
    """A LIVESPLICE_* hook of the update: its kind, function, target and code."""

    kind: str  # one of HOOK_KINDS
    function: str  # name of the hook function in the update
    target: str  # target name
    key: str  # section key of the hook code


@dataclass
class Manifest:
    """The update's manifest: what it is, what it was built with (compiler, patch digest) and
    what it changes in which target; the contract between create and apply."""

    id: str
    description: str
    compiler: str  # compiler identity, as .comment records it ("GCC: (Debian 12.2.0-14) 12.2.0")
    patch_sha256: str
    targets: list[Target]
    hooks: list[Hook] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    format: str = FORMAT
    created_by: str = "livesplice"
    # what the update was built from when create knew it ("Debian redis 5:7.0.15-1~deb12u7")
    source: str = ""

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, fixed separators -> byte-identical for same inputs."""
        return json.dumps(asdict(self), sort_keys=True, indent=1, separators=(",", ": ")) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Decode a manifest, checking every field's type (the file may come from anyone until
        its signature is checked)."""
        raw = json.loads(text)
        return manifest_from_dict(raw)

    @property
    def is_kernel(self) -> bool:
        """Whether this update is for the running kernel (vmlinux or kernel modules), applied
        by loading a livepatch module rather than into processes: the one place that decides
        which engine an update belongs to."""
        return any(t.kind in ("kernel", "kernel_module") for t in self.targets)


# ---------------------------------------------------------------- strict decoding
#
# A manifest comes from a file that may be hostile (and, under --allow-unsigned, unsigned):
# every field is checked against the dataclass's own type hints, then against the ranges and
# relations apply relies on, before any of it is used. One rule per idea, in one place.

ID_PATTERN = re.compile(r"[a-z0-9_-]{1,32}")
MAX_ITEMS = 1 << 16  # entries in any list or object of a manifest
MAX_STRING = 1 << 26  # characters of any one string (hex code of a big function included)
MAX_SECTION = 1 << 24  # bytes of one section


def check_update_id(update_id: object) -> str:
    """The one rule for update ids (create, apply, view, undo, the kernel module name):
    1-32 characters from a-z, 0-9, '_' and '-'. Ids become memfd names (``livesplice:ID``),
    journal file names and module names, so nothing else is allowed in them.

    :raises UsageError: with the rule.
    """
    if not isinstance(update_id, str) or not ID_PATTERN.fullmatch(update_id):
        from livesplice.errors import UsageError

        raise UsageError(
            f"bad update id {update_id!r:.80}",
            advice="use 1-32 characters from a-z, 0-9, '_' and '-'",
        )
    return update_id


class _Bad(ValueError):
    pass


def _decode(tp: Any, raw: object, where: str) -> Any:
    """``raw`` (decoded JSON) as a value of type ``tp``, or :class:`_Bad` saying where."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return raw
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _decode_dataclass(tp, raw, where)
    if origin is Literal:
        if raw not in typing.get_args(tp) or isinstance(raw, bool):
            raise _Bad(f"{where}: {raw!r:.60} is not one of {typing.get_args(tp)}")
        return raw
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if raw is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return _decode(rest[0], raw, where)
    if origin is list:
        if not isinstance(raw, list) or len(raw) > MAX_ITEMS:
            raise _Bad(f"{where}: not a list of at most {MAX_ITEMS} items")
        (item,) = typing.get_args(tp)
        return [_decode(item, x, f"{where}[{i}]") for i, x in enumerate(raw)]
    if origin is dict:
        if not isinstance(raw, dict) or len(raw) > MAX_ITEMS:
            raise _Bad(f"{where}: not an object of at most {MAX_ITEMS} entries")
        _k, v = typing.get_args(tp)
        return {str(k): _decode(v, x, f"{where}.{k}") for k, x in raw.items()}
    if tp is bool:
        if not isinstance(raw, bool):
            raise _Bad(f"{where}: not true/false")
        return raw
    if tp is int:
        if not isinstance(raw, int) or isinstance(raw, bool) or abs(raw) >= 1 << 63:
            raise _Bad(f"{where}: not a 64-bit integer")
        return raw
    if tp is str:
        if not isinstance(raw, str) or len(raw) > MAX_STRING:
            raise _Bad(f"{where}: not a string")
        return raw
    raise _Bad(f"{where}: cannot decode type {tp}")  # a type this decoder does not know


@functools.cache
def _shape(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field[Any]]]:
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _decode_dataclass(cls: type, raw: object, where: str) -> Any:
    if not isinstance(raw, dict):
        raise _Bad(f"{where}: not an object")
    hints, fields = _shape(cls)
    unknown = set(raw) - set(fields)
    if unknown:
        raise _Bad(f"{where}: unknown field(s) {sorted(unknown)!r:.80}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Bad(f"{where}: missing field {name!r}")
            continue
        values[name] = _decode(hints[name], raw[name], f"{where}.{name}")
    return cls(**values)


_HEX = re.compile(r"(?:[0-9a-f]{2})*")


def _check_manifest(m: Manifest) -> None:
    """Relations the types alone do not say (ranges, uniqueness, references)."""
    if not ID_PATTERN.fullmatch(m.id):
        raise _Bad(
            f"id {m.id!r:.80} breaks the rule for update ids (1-32 characters from "
            "a-z, 0-9, '_' and '-')"
        )
    names = [t.name for t in m.targets]
    if len(set(names)) != len(names):
        raise _Bad(
            f"targets: {sorted({n for n in names if names.count(n) > 1})!r:.80} listed "
            "twice (a function would be patched twice)"
        )
    for t in m.targets:
        if t.build_id and not _HEX.fullmatch(t.build_id):
            raise _Bad(f"target {t.name!r:.60}: build_id is not hex")
        for v in t.verified:
            if not v.build_id or not _HEX.fullmatch(v.build_id) or v.functions < 0:
                raise _Bad(
                    f"target {t.name!r:.60}: verified binary {v.file!r:.60} has no hex build-id"
                )
        seen: set[tuple[str, str]] = set()
        for s in t.sections:
            where = f"target {t.name!r:.60} section {s.key!r:.60}"
            if (s.key, s.role) in seen:
                raise _Bad(f"{where}: listed twice as {s.role}")
            seen.add((s.key, s.role))
            if (
                not 0 <= s.size <= MAX_SECTION
                or not _HEX.fullmatch(s.data)
                or len(s.data) > 2 * s.size
            ):
                raise _Bad(f"{where}: size/data out of range or data not hex")
            if s.align < 1 or s.align & (s.align - 1) or s.align > 1 << 16:
                raise _Bad(f"{where}: alignment {s.align} is not a power of two <= 65536")
            for r in s.relocs:
                if not 0 <= r.offset <= s.size - 1:
                    raise _Bad(f"{where}: relocation at {r.offset} outside the section")
            for key, off in s.symbols.items():
                if not 0 <= off <= s.size:
                    raise _Bad(f"{where}: symbol {key!r:.60} at {off} outside the section")
            for site in s.sites:
                _check_site(site, s, where)
    for h in m.hooks:
        if h.kind not in HOOK_KINDS:
            raise _Bad(f"hook {h.function!r:.60}: unknown kind {h.kind!r:.40}")


MAX_PATCH_LEN = 255  # struct paravirt_patch_site.len and alt_instr.instrlen are u8


def _check_site(site: PatchSite, s: Section, where: str) -> None:
    """A patch site lies inside its section, its replacement fits in it, and the
    replacement's relocations lie inside the replacement."""
    if not 0 < site.length <= MAX_PATCH_LEN or not 0 <= site.offset <= s.size - site.length:
        raise _Bad(
            f"{where}: {site.kind} site at {site.offset} (+{site.length}) outside the section"
        )
    if not 0 <= site.pv_type <= 0xFF or not 0 <= site.feature <= 0xFFFF:
        raise _Bad(f"{where}: {site.kind} site at {site.offset}: type or feature out of range")
    if not _HEX.fullmatch(site.replacement) or len(site.replacement) > 2 * site.length:
        raise _Bad(
            f"{where}: {site.kind} site at {site.offset}: replacement not hex or longer "
            "than the site"
        )
    for r in site.relocs:
        if not 0 <= r.offset < len(site.replacement) // 2:
            raise _Bad(
                f"{where}: {site.kind} site at {site.offset}: relocation at {r.offset} "
                "outside the replacement"
            )


def manifest_from_dict(raw: object) -> Manifest:
    """A :class:`Manifest` from decoded JSON, every field checked (see above).

    :raises ValueError: what is wrong and where (the archive reader turns it into
        MALFORMED_UPDATE).
    """
    m = _decode_dataclass(Manifest, raw, "manifest")
    assert isinstance(m, Manifest)
    _check_manifest(m)
    return m
