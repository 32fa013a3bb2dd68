"""What the build stage hands to the diff stage.

The compiler wrapper (``livesplice.build.wrapper``) records every compile and every link it
sees; the builder turns those records into a :class:`BuildPair`: for each compiled unit the
pre object and (if the patch made it recompile) the post object, and for each linked output
the objects that went into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class CompileRecord:
    """One compiler invocation that produced an object file."""

    source: str  # source path relative to the tree root ("src/net.c")
    object: Path  # absolute path of a saved copy of the object file
    argv: list[str]  # full command line as the build issued it (before our extra flags)
    cwd: str
    compiler: str  # compiler identity, e.g. "gcc (Debian 12.2.0-14+deb12u1) 12.2.0"
    language: Literal["c", "c++", "asm"]
    built_object: str  # the object path the build wrote (absolute), for link correlation


@dataclass
class LinkRecord:
    """One link that produced an executable or shared library."""

    output: Path  # absolute path of a saved copy of the linked file
    name: str  # file name of the output ("server", "libfoo.so.1")
    kind: Literal["executable", "shared_library"]
    inputs: list[str]  # absolute paths (as the build wrote them) of objects/archives linked in
    argv: list[str]
    cwd: str


@dataclass
class UnitPair:
    """A compiled unit before and after the patch."""

    source: str
    pre: CompileRecord
    # None: unchanged -- the unit did not recompile, or recompiled to a byte-identical object
    post: CompileRecord | None
    targets: list[str]  # names of the link outputs this unit's object went into


@dataclass
class BuildPair:
    """Result of building the tree twice (pre, then patched post, incrementally)."""

    workdir: Path
    units: list[UnitPair]
    links: list[LinkRecord]  # pre links
    compiler: str  # identity of the compiler used for the changed units
    patch_text: str
    new_units: list[CompileRecord] = field(default_factory=list)  # units only in post
    # new unit's built_object -> names of the link outputs it went into (post build)
    new_unit_targets: dict[str, list[str]] = field(default_factory=dict)
    removed_units: list[str] = field(default_factory=list)
    changed_asm: list[str] = field(default_factory=list)  # assembly sources the patch touched
    # source files the patch touched that produced no object at all (headers, docs, ...)
    touched_files: list[str] = field(default_factory=list)
