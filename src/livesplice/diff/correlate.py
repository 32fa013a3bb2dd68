"""Pre <-> post twins for symbols and sections: a funnel of rules, strictest first.

Each rule only looks at symbols the earlier rules left without a twin, and pairs two symbols
only when the pairing is unambiguous (exactly one candidate on each side):

1. **Exact name.** ``work`` <-> ``work``; a global is unique by name, and so is a local that
   gcc did not number (``static int helper(...)`` -> ``helper``). Numbered locals skip this
   rule: ``counter.0`` in pre and ``counter.0`` in post can be two different variables.
2. **gcc clone suffixes, numbers ignored.** ``parse.isra.0`` <-> ``parse.isra.1``,
   ``cl.constprop.0`` <-> ``cl.constprop.2``, ``run.part.0`` <-> ``run.part.1``,
   ``main.cold`` <-> ``main.cold``: gcc numbers clones per unit, so an unrelated new clone
   renumbers the others.
3. **Numbered static locals, by the functions that use them.** pre has ``counter.0`` (used by
   ``f``) and ``counter.1`` (used by ``g``); the patch adds a ``static int counter`` to a new
   function ``h``, and post has ``counter.0`` (``h``), ``counter.1`` (``f``), ``counter.2``
   (``g``): ``counter.0`` <-> ``counter.1`` because both are used by ``f``, ``counter.1`` <->
   ``counter.2`` by ``g``; post ``counter.0`` is new. When the users differ (the patch changed
   which functions touch it) but only one ``counter.N`` is left on each side, they pair.
   Same for the kernel's ``__COUNTER__`` names (``__UNIQUE_ID___addressable_init_module717``:
   the counter is pasted onto the name without a dot), numbers ignored.
   Several **zero-size** ones used by the same functions (a function calling ``mutex_init``
   and ``init_rwsem`` has one ``static struct lock_class_key __key`` each: no bytes without
   lockdep) pair in the order the code first refers to them: they hold no state, so only
   the order matters for comparing the code that uses them. Variables with bytes pair so
   only when each is first used at the same offset of the same function on both sides and
   starts with the same content (two ``printk_ratelimited`` states ``_rs.N`` of one error
   path); otherwise two ``counter.N`` of one function stay unpaired (changed).
4. **Numbered data nothing's code uses, by content**: a ``__UNIQUE_ID_*N`` pointer table entry
   is referenced by no function; it pairs with the one of the same base name whose bytes and
   relocation targets (by their twins' names) are the same. A renumbering alone is then no
   change; an entry whose content differs stays unpaired (new/removed), never claimed.
5. **Sections without a named symbol** (string literals ``.rodata.work.str1.1``, constant
   pools ``.rodata.cst8``, switch jump tables ``.rodata.work``): by section name, clone
   numbers ignored. A section holding a named function or object takes its symbol's twin.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

from livesplice.diff.elfmodel import (
    NUMBER_SUFFIX,
    ElfObject,
    ObjReloc,
    ObjSection,
    ObjSymbol,
    strip_clone_numbers,
)


def correlate(pre: ElfObject, post: ElfObject) -> None:
    """Set ``twin`` on every symbol and section of ``pre`` and ``post`` that has one."""
    pre_syms = _named_symbols(pre)
    post_syms = _named_symbols(post)
    _pair_by(pre_syms, post_syms, _exact_name_key)
    _pair_by(pre_syms, post_syms, _clone_key)
    users = {**_users(pre), **_users(post)}
    _pair_by(pre_syms, post_syms, lambda s: _static_local_key(s, users))
    _pair_stateless_by_first_use(pre, post, pre_syms, post_syms, users)
    _pair_by(pre_syms, post_syms, _content_key)
    _pair_by(pre_syms, post_syms, _static_local_base)
    _correlate_sections(pre, post)


def twin_name(sym: ObjSymbol) -> str:
    """The name a post symbol goes by in pre (its twin's), else its own."""
    return sym.twin.name if sym.twin is not None else sym.name


def _named_symbols(obj: ElfObject) -> list[ObjSymbol]:
    return [
        s
        for s in obj.symbols
        if s.section is not None and s.type in ("func", "object", "tls") and s.name
    ]


# include/linux/compiler.h: __UNIQUE_ID(prefix) pastes __COUNTER__ onto the name.
_COUNTER_NAME = re.compile(r"^(__UNIQUE_ID_\w*?)\d+$")


def _numbered_base(name: str) -> str | None:
    """The name without its compiler-given number; None for a name gcc did not number."""
    if NUMBER_SUFFIX.search(name):
        return NUMBER_SUFFIX.sub("", name)
    m = _COUNTER_NAME.match(name)
    return m.group(1) if m else None


def _is_numbered_local(sym: ObjSymbol) -> bool:
    return sym.bind == "local" and sym.type != "func" and _numbered_base(sym.name) is not None


def _exact_name_key(sym: ObjSymbol) -> str | None:
    return None if _is_numbered_local(sym) else f"{sym.type}:{sym.name}"


def _clone_key(sym: ObjSymbol) -> str | None:
    if sym.type != "func":
        return None
    stripped = strip_clone_numbers(sym.name)
    return f"func:{stripped}"


def _static_local_base(sym: ObjSymbol) -> str | None:
    if not _is_numbered_local(sym):
        return None
    return f"{sym.type}:{_numbered_base(sym.name)}"


def _content_key(sym: ObjSymbol) -> str | None:
    """Base name + bytes + relocation targets (twin names): numbered data told by content."""
    base = _static_local_base(sym)
    sec = sym.section
    if base is None or sec is None:
        return None
    end = sym.value + sym.size
    data = sec.data[sym.value : end].hex() if sec.data else f"nobits{sym.size}"
    refs = [
        f"{r.offset - sym.value}:{r.type}:{_ref_name(r.symbol)}+{r.addend}"
        for r in sec.relocs
        if sym.value <= r.offset < end
    ]
    return f"{base}={data}|{','.join(refs)}"


def _ref_name(target: ObjSymbol) -> str:
    """The same string on both sides for a symbol and its twin (clones are renumbered)."""
    if target.type == "section" and target.section is not None:
        if target.section.primary is None:
            return target.section.name
        target = target.section.primary
    names = {target.name} | ({target.twin.name} if target.twin is not None else set())
    return "/".join(sorted(names))


def _static_local_key(sym: ObjSymbol, users: dict[ObjSymbol, frozenset[str]]) -> str | None:
    base = _static_local_base(sym)
    if base is None:
        return None
    return base + "@" + ",".join(sorted(users.get(sym, frozenset())))


def _pair_by(
    pre: list[ObjSymbol],
    post: list[ObjSymbol],
    key: Callable[[ObjSymbol], str | None],
) -> None:
    """Pair unpaired symbols whose ``key`` is equal and unique on both sides."""
    pre_by: dict[str, list[ObjSymbol]] = defaultdict(list)
    post_by: dict[str, list[ObjSymbol]] = defaultdict(list)
    for s in pre:
        k = key(s) if s.twin is None else None
        if k is not None:
            pre_by[k].append(s)
    for s in post:
        k = key(s) if s.twin is None else None
        if k is not None:
            post_by[k].append(s)
    for k, olds in pre_by.items():
        news = post_by.get(k, [])
        if len(olds) == 1 and len(news) == 1:
            olds[0].twin = news[0]
            news[0].twin = olds[0]


def _references(obj: ElfObject) -> Iterator[tuple[ObjSymbol, ObjReloc, ObjSymbol]]:
    """(function, relocation, local data symbol it reaches) for every code relocation."""
    from livesplice.diff.compare import MeaningContext, object_at

    where = MeaningContext("users")
    for sec in obj.sections:
        fn = sec.primary if sec.is_code else None
        if fn is None:
            continue
        for rel in sec.relocs:
            # A reference through the section symbol (``.data.once + 8``) uses the one
            # variable at that offset, not every variable of the section.
            holder = None
            if rel.symbol.type == "section" and rel.symbol.section is not None:
                holder = object_at(rel.symbol.section, where.target_offset(sec, rel))
            for target in [holder] if holder is not None else _data_symbols_of(rel.symbol):
                yield fn, rel, target


def _users(obj: ElfObject) -> dict[ObjSymbol, frozenset[str]]:
    """For each local data symbol: the names (pre names for post) of functions using it."""
    users: dict[ObjSymbol, set[str]] = defaultdict(set)
    for fn, _rel, target in _references(obj):
        users[target].add(twin_name(fn))
    return {s: frozenset(u) for s, u in users.items()}


def _first_use(obj: ElfObject) -> dict[ObjSymbol, tuple[str, int]]:
    """For each local data symbol: (function's pre name, offset) of its first reference."""
    first: dict[ObjSymbol, tuple[str, int]] = {}
    for fn, rel, target in _references(obj):
        pos = (twin_name(fn), rel.offset)
        if target not in first or pos < first[target]:
            first[target] = pos
    return first


def _pair_stateless_by_first_use(
    pre: ElfObject,
    post: ElfObject,
    pre_syms: list[ObjSymbol],
    post_syms: list[ObjSymbol],
    users: dict[ObjSymbol, frozenset[str]],
) -> None:
    """Numbered locals with the same base name and users, paired in order of first use.

    A wrong pair of variables with bytes would hand the new code another variable's state,
    so those pair only where the places of first use are the same on both sides; a
    zero-size one (``lock_class_key`` without lockdep) has no state, and the order of first
    use makes identical code compare identical.
    """

    def groups(
        syms: list[ObjSymbol], first: dict[ObjSymbol, tuple[str, int]]
    ) -> dict[str, list[ObjSymbol]]:
        out: dict[str, list[ObjSymbol]] = defaultdict(list)
        for s in syms:
            key = _static_local_key(s, users) if s.twin is None else None
            if key is not None and s in first:
                out[key].append(s)
        return out

    pre_first, post_first = _first_use(pre), _first_use(post)
    post_groups = groups(post_syms, post_first)
    for key, olds in groups(pre_syms, pre_first).items():
        news = post_groups.get(key, [])
        if len(olds) != len(news) or len(olds) < 2:
            continue  # one each: the base-name rule pairs them; other counts: no order to trust
        olds.sort(key=pre_first.__getitem__)
        news.sort(key=post_first.__getitem__)
        if any(s.size for s in olds + news):
            # variables with state: only where each is first used at the same place of the
            # same function on both sides, with the same initial content (two
            # printk_ratelimited states of one function: `_rs.14`, `_rs.16`)
            same_places = [pre_first[a] for a in olds] == [post_first[b] for b in news]
            if (
                not same_places
                or any(_content_key(a) != _content_key(b) for a, b in zip(olds, news, strict=True))
                or not _same_code(pre, users.get(olds[0], frozenset()))
            ):
                continue
        for a, b in zip(olds, news, strict=True):
            a.twin, b.twin = b, a


def _same_code(pre: ElfObject, names: frozenset[str]) -> bool:
    """Every function of ``names`` (pre names, already paired) has the same bytes and
    relocation places in post: its references are then the same references, in order."""
    found = 0
    for sec in pre.sections:
        fn = sec.primary if sec.is_code else None
        if fn is None or fn.name not in names:
            continue
        twin = fn.twin.section if fn.twin is not None else None
        if twin is None or sec.data != twin.data:
            return False
        shape = [(r.offset, r.type, r.addend) for r in sec.relocs]
        if shape != [(r.offset, r.type, r.addend) for r in twin.relocs]:
            return False
        found += 1
    return found == len(names)


def _data_symbols_of(sym: ObjSymbol) -> Iterable[ObjSymbol]:
    if sym.type == "section" and sym.section is not None:
        return [s for s in sym.section.symbols if s.type in ("object", "tls")]
    if sym.type in ("object", "tls"):
        return [sym]
    return []


def _section_key(sec: ObjSection) -> str:
    return strip_clone_numbers(NUMBER_SUFFIX.sub("", sec.name))


def _correlate_sections(pre: ElfObject, post: ElfObject) -> None:
    for sec in pre.sections:
        p = sec.primary
        if p is not None and p.twin is not None and p.twin.section is not None:
            sec.twin = p.twin.section
            p.twin.section.twin = sec
    pre_rest = [s for s in pre.sections if s.twin is None and s.primary is None]
    post_rest = [s for s in post.sections if s.twin is None and s.primary is None]
    for exact in (True, False):
        pre_by: dict[str, list[ObjSection]] = defaultdict(list)
        post_by: dict[str, list[ObjSection]] = defaultdict(list)
        for s in pre_rest:
            if s.twin is None:
                pre_by[s.name if exact else _section_key(s)].append(s)
        for s in post_rest:
            if s.twin is None:
                post_by[s.name if exact else _section_key(s)].append(s)
        for k, olds in pre_by.items():
            news = post_by.get(k, [])
            if len(olds) == 1 and len(news) == 1:
                olds[0].twin = news[0]
                news[0].twin = olds[0]
