"""The update file: the contract between ``create`` (build/diff/package) and ``apply``.

An update file is a deterministic gzip-compressed tar archive::

    manifest.json      everything apply needs (this module's :class:`Manifest`)
    patch              the patch text, verbatim
    signature          reserved: a detached signature over manifest.json (signing comes later)

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

import json
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

    @property
    def bytes(self) -> bytes:
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


@dataclass
class Hook:
    kind: str  # one of HOOK_KINDS
    function: str  # name of the hook function in the update
    target: str  # target name
    key: str  # section key of the hook code


@dataclass
class Manifest:
    id: str
    description: str
    compiler: str  # compiler identity, as .comment records it ("GCC: (Debian 12.2.0-14) 12.2.0")
    patch_sha256: str
    targets: list[Target]
    hooks: list[Hook] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    format: str = FORMAT
    created_by: str = "livesplice"

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, fixed separators -> byte-identical for same inputs."""
        return json.dumps(asdict(self), sort_keys=True, indent=1, separators=(",", ": ")) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        return manifest_from_dict(raw)


def _section_from_dict(d: dict[str, Any]) -> Section:
    d = dict(d)
    d["relocs"] = [Reloc(**r) for r in d.get("relocs", [])]
    return Section(**d)


def _target_from_dict(d: dict[str, Any]) -> Target:
    d = dict(d)
    d["sections"] = [_section_from_dict(s) for s in d["sections"]]
    d["symbols"] = {k: SymbolInfo(**v) for k, v in d["symbols"].items()}
    return Target(**d)


def manifest_from_dict(raw: dict[str, Any]) -> Manifest:
    """Build a :class:`Manifest` from parsed JSON; raises KeyError/TypeError on bad shape."""
    raw = dict(raw)
    raw["targets"] = [_target_from_dict(t) for t in raw["targets"]]
    raw["hooks"] = [Hook(**h) for h in raw.get("hooks", [])]
    return Manifest(**raw)
