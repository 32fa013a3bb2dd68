"""DWARF type-layout check: did the patch change the memory layout of a type in use?

Code swapping cannot change memory that already exists: objects allocated by the running
program keep their old size and member offsets. A patch that grows ``char name[MAXDNAME]``
in a header (the dnsmasq CVE-2026-2291 pattern) changes a layout even when no function's text
changes, and new code that trusts the new size overflows the old objects. So for every unit we
compare, between pre and post DWARF (the build wrapper always adds ``-g``):

* every named struct/union/class/enum and every typedef of an anonymous aggregate: byte size,
  member names, offsets (bit offsets for bit-fields) and member types, array bounds;
* the type of every variable with static storage (globals and static locals).

A changed layout is refused when something in the unit uses the type: a variable ("live
data"), or a function (through parameters, locals, pointers, members -- pointer targets
included, since ``p->field`` through a pointer reads live memory). Stack-only arrays
(``char buf[N]`` local to a function) are not named types and may change freely.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from livesplice.diff.dwarf import open_dwarf

if TYPE_CHECKING:
    # pyelftools has no type hints: to mypy these are Any, to a reader they say what it is
    from elftools.dwarf.die import DIE, AttributeValue

_AGGREGATES = ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_class_type")
_KIND = {
    "DW_TAG_structure_type": "struct",
    "DW_TAG_union_type": "union",
    "DW_TAG_class_type": "class",
}
_QUALIFIERS = (
    "DW_TAG_const_type",
    "DW_TAG_volatile_type",
    "DW_TAG_restrict_type",
    "DW_TAG_atomic_type",
    "DW_TAG_typedef",
)


@dataclass(frozen=True)
class Member:
    """One member of an aggregate as the layout sees it."""

    name: str  # "" for an anonymous member
    where: str  # byte offset ("8"), or bit offset and width of a bit-field ("bit33:3b")
    layout: str  # the member type's layout text


@dataclass(frozen=True)
class Shape:
    """Size and members of an aggregate: what a person is told changed, beyond "differs"."""

    size: int | None
    members: tuple[Member, ...] = ()


@dataclass
class UnitTypes:
    """The layouts of the named types of one object and who uses them."""

    layouts: dict[str, str] = field(default_factory=dict)  # type key -> layout text
    shapes: dict[str, Shape] = field(default_factory=dict)  # type key -> size and members
    variables: dict[str, str] = field(default_factory=dict)  # variable -> layout of its type
    # variable -> the named type it is an object of ("struct session"), when it is one
    variable_types: dict[str, str] = field(default_factory=dict)
    users: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))


@dataclass
class LayoutChange:
    """A type (or variable) whose memory layout the patch changes, with who uses it: the running
    program's data still has the old layout, so the change is refused with this."""

    type_key: str  # "struct req", "typedef cfg_t", or "variable table"
    pre: str
    post: str
    users: list[str]  # "function f", "data v"
    # what changed, for a person: "size 16 -> 24 bytes; added started (long:8 at 8); ..."
    what: str = ""


def read_unit_types(path: Path) -> UnitTypes | None:
    """Named type layouts and users of the object at ``path``; None without DWARF."""
    dwarf = open_dwarf(path)
    if dwarf is None:
        return None
    out = UnitTypes()
    for cu in dwarf.iter_CUs():
        top = cu.get_top_DIE()
        for die in top.iter_children():
            _visit_top(die, out)
    return out


def compare_layouts(pre: UnitTypes, post: UnitTypes) -> list[LayoutChange]:
    """Types (and static variables) whose layout differs and that post code or data uses."""
    changes: list[LayoutChange] = []
    for key in sorted(set(pre.layouts) & set(post.layouts)):
        if pre.layouts[key] == post.layouts[key]:
            continue
        users = sorted(post.users.get(key, set()) | pre.users.get(key, set()))
        if users:
            what = describe_change(
                pre.shapes.get(key), post.shapes.get(key), pre.layouts[key], post.layouts[key]
            )
            changes.append(LayoutChange(key, pre.layouts[key], post.layouts[key], users, what))
    refused = {c.type_key for c in changes}
    for var in sorted(set(pre.variables) & set(post.variables)):
        if post.variable_types.get(var) in refused:
            continue  # said once, with the type: the variable is among its users
        if pre.variables[var] != post.variables[var]:
            a, b = pre.variables[var], post.variables[var]
            changes.append(
                LayoutChange(
                    f"variable {var}", a, b, [f"data {var}"], f"type {_short(a)} -> {_short(b)}"
                )
            )
    return changes


def describe_change(pre: Shape | None, post: Shape | None, pre_text: str, post_text: str) -> str:
    """What differs between two layouts of one type, in words: the size, then members added,
    removed, moved (offset) and retyped. The whole layout text only when nothing more
    specific can be said (a change inside an anonymous member, an enum's size)."""
    parts: list[str] = []
    if pre is not None and post is not None:
        if pre.size != post.size:
            parts.append(f"size {pre.size} -> {post.size} bytes")
        before = {m.name or f"(anonymous #{i})": m for i, m in enumerate(pre.members)}
        after = {m.name or f"(anonymous #{i})": m for i, m in enumerate(post.members)}
        added = [
            f"{n} ({_short(m.layout)} at {m.where})" for n, m in after.items() if n not in before
        ]
        removed = [n for n in before if n not in after]
        moved = [
            f"{n} {before[n].where} -> {m.where}"
            for n, m in after.items()
            if n in before and before[n].where != m.where
        ]
        retyped = [
            f"{n} {_short(before[n].layout)} -> {_short(m.layout)}"
            for n, m in after.items()
            if n in before and before[n].layout != m.layout
        ]
        for label, items in (
            ("added", added),
            ("removed", removed),
            ("moved", moved),
            ("retyped", retyped),
        ):
            if items:
                parts.append(f"{label} " + ", ".join(items))
    return "; ".join(parts) or f"layout {_short(pre_text)} -> {_short(post_text)}"


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _name(die: DIE) -> str | None:
    attr = die.attributes.get("DW_AT_name")
    if attr is None:
        return None
    v = attr.value
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _type_of(die: DIE) -> DIE | None:
    if "DW_AT_type" not in die.attributes:
        return None
    return die.get_DIE_from_attribute("DW_AT_type")


def _int_attr(die: DIE, name: str) -> int | None:
    attr = die.attributes.get(name)
    if attr is None or not isinstance(attr.value, int):
        return None
    return int(attr.value)


def _type_key(die: DIE) -> str | None:
    """``struct req`` / ``union u`` / ``enum e`` / ``typedef cfg_t`` (typedef of anonymous)."""
    name = _name(die)
    tag = die.tag
    if tag in _AGGREGATES and name:
        return f"{_KIND[tag]} {name}"
    if tag == "DW_TAG_enumeration_type" and name:
        return f"enum {name}"
    if tag == "DW_TAG_typedef" and name:
        target = _type_of(die)
        if target is not None and target.tag in _AGGREGATES and _name(target) is None:
            return f"typedef {name}"
    return None


def layout_of(die: DIE | None, depth: int = 0) -> str:
    """Canonical text of a type's memory layout (qualifiers and typedef names dropped)."""
    if die is None:
        return "void"
    tag = die.tag
    if tag in _QUALIFIERS:
        target = _type_of(die)
        return layout_of(target, depth)
    if tag == "DW_TAG_base_type":
        return f"{_name(die)}:{_int_attr(die, 'DW_AT_byte_size')}"
    if tag in ("DW_TAG_pointer_type", "DW_TAG_reference_type", "DW_TAG_rvalue_reference_type"):
        return f"ptr:{_int_attr(die, 'DW_AT_byte_size') or 8}"
    if tag == "DW_TAG_enumeration_type":
        return f"enum:{_int_attr(die, 'DW_AT_byte_size')}"
    if tag == "DW_TAG_subroutine_type":
        return "fn"
    if tag == "DW_TAG_array_type":
        dims = []
        for sub in die.iter_children():
            if sub.tag != "DW_TAG_subrange_type":
                continue
            count = _int_attr(sub, "DW_AT_count")
            upper = _int_attr(sub, "DW_AT_upper_bound")
            if count is None and upper is not None:
                count = upper + 1
            dims.append("" if count is None else str(count))
        return f"{layout_of(_type_of(die), depth + 1)}[{']['.join(dims)}]"
    if tag in _AGGREGATES:
        size = _int_attr(die, "DW_AT_byte_size")
        key = _type_key(die)
        if key is not None and depth > 0:
            # named members are compared under their own name; the size still shows here
            return f"{key}:{size}"
        if depth > 8:
            return f"{{{size}}}"
        members = []
        for m in die.iter_children():
            if m.tag not in ("DW_TAG_member", "DW_TAG_inheritance"):
                continue
            members.append(f"{_name(m) or ''}@{_where(m)}={layout_of(_type_of(m), depth + 1)}")
        decl = " decl" if "DW_AT_declaration" in die.attributes else ""
        return f"{{{size}{decl};{';'.join(members)}}}"
    return str(tag).removeprefix("DW_TAG_")


def _where(member: DIE) -> str:
    """A member's place: its byte offset, or bit offset and width for a bit-field."""
    off = _int_attr(member, "DW_AT_data_member_location")
    bit_off = _int_attr(member, "DW_AT_data_bit_offset")
    bits = _int_attr(member, "DW_AT_bit_size")
    where = f"{off}" if bit_off is None else f"bit{bit_off}"
    return where + (f":{bits}b" if bits is not None else "")


def shape_of(die: DIE | None) -> Shape:
    """Size and members of a type (through qualifiers and typedefs), as :func:`layout_of`
    sees them; an enum or a base type has a size and no members."""
    while die is not None and die.tag in _QUALIFIERS:
        die = _type_of(die)
    if die is None:
        return Shape(None)
    members = []
    if die.tag in _AGGREGATES:
        for m in die.iter_children():
            if m.tag not in ("DW_TAG_member", "DW_TAG_inheritance"):
                continue
            members.append(Member(_name(m) or "", _where(m), layout_of(_type_of(m), 1)))
    return Shape(_int_attr(die, "DW_AT_byte_size"), tuple(members))


def _visit_top(die: DIE, out: UnitTypes) -> None:
    key = _type_key(die)
    if key is not None and "DW_AT_declaration" not in die.attributes:
        out.layouts[key] = layout_of(die)
        out.shapes[key] = shape_of(die)
    if die.tag == "DW_TAG_variable" and "DW_AT_location" in die.attributes:
        name = _name(die) or _name_via_specification(die)
        if name and not _is_const(_type_of(die)):
            out.variables[name] = layout_of(_type_of(die))
            _note_variable_type(out, name, _type_of(die))
            for k in _reachable_type_keys(_type_of(die)):
                out.users[k].add(f"data {name}")
    if die.tag == "DW_TAG_subprogram" and "DW_AT_declaration" not in die.attributes:
        name = _name(die) or _name_via_specification(die) or "?"
        for child in _descendants(die):
            if child.tag == "DW_TAG_variable" and "DW_AT_location" in child.attributes:
                loc = child.attributes["DW_AT_location"]
                if _is_static_location(loc) and not _is_const(_type_of(child)):
                    var = f"{name}::{_name(child)}"
                    out.variables[var] = layout_of(_type_of(child))
                    _note_variable_type(out, var, _type_of(child))
            for k in _reachable_type_keys(_type_of(child)):
                out.users[k].add(f"function {name}")
        for k in _reachable_type_keys(_type_of(die)):
            out.users[k].add(f"function {name}")


def _note_variable_type(out: UnitTypes, var: str, die: DIE | None) -> None:
    """Record the named type ``var`` is an object (or an array) of, through qualifiers and
    typedefs: ``static struct conn pool[4]`` changes exactly when struct conn does."""
    while die is not None:
        key = _type_key(die)
        if key is not None:
            out.variable_types[var] = key
            return
        die = _type_of(die) if die.tag in (*_QUALIFIERS, "DW_TAG_array_type") else None


def _is_const(die: DIE | None) -> bool:
    """Read-only storage: the diff ships a private copy of it, so its layout may change."""
    while die is not None and die.tag in (
        "DW_TAG_typedef",
        "DW_TAG_array_type",
        "DW_TAG_volatile_type",
    ):
        die = _type_of(die)
    return die is not None and die.tag == "DW_TAG_const_type"


def _name_via_specification(die: DIE) -> str | None:
    for attr in ("DW_AT_specification", "DW_AT_abstract_origin"):
        if attr in die.attributes:
            return _name(die.get_DIE_from_attribute(attr))
    return None


def _is_static_location(loc: AttributeValue) -> bool:
    # DW_OP_addr (0x03) as the first operation: a fixed address, i.e. static storage
    v = loc.value
    return isinstance(v, list) and bool(v) and v[0] == 0x03


def _descendants(die: DIE) -> list[DIE]:
    out: list[DIE] = []
    stack = list(die.iter_children())
    while stack:
        d = stack.pop()
        out.append(d)
        stack.extend(d.iter_children())
    return out


def _reachable_type_keys(die: DIE | None) -> set[str]:
    """Named types reachable from a type: through typedefs, pointers, arrays and members."""
    keys: set[str] = set()
    seen: set[int] = set()
    stack = [die]
    while stack:
        d = stack.pop()
        if d is None or d.offset in seen:
            continue
        seen.add(d.offset)
        key = _type_key(d)
        if key is not None:
            keys.add(key)
        stack.append(_type_of(d))
        if d.tag in _AGGREGATES:
            stack.extend(_type_of(m) for m in d.iter_children() if m.tag == "DW_TAG_member")
    return keys
