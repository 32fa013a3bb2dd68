"""Run-pre matching against the running kernel: /proc/kallsyms for candidates, /proc/kcore
for the running text.

Every ``pre`` section of a kernel target is compared instruction by instruction with the
running code of each same-named candidate. Relocation fields are wildcards whose running
values reveal the addresses of the symbols they point at (that is how the ``sympos`` of a
static symbol with a duplicated name is decided). Differences the kernel makes at boot
are accepted, each for its own reason:

* ``call __fentry__`` at the entry became a 5-byte nop (ftrace, or a call to an ftrace
  trampoline when the function is already patched);
* ``jmp __x86_return_thunk`` became ``ret; int3 x4`` (arch/x86/kernel/alternative.c
  apply_returns on CPUs without the return-thunk mitigation);
* ``call/jmp __x86_indirect_thunk_<reg>`` became an indirect call/jmp padded with nops
  (apply_retpolines);
* a static call site may point straight at its current target (HAVE_STATIC_CALL_INLINE);
* on a uniprocessor boot, ``lock`` prefixes became ``ds`` prefixes (alternatives_smp_unlock);
* a branch with a rel8 displacement in one and rel32 in the other (``-ffunction-sections``
  changes some tail jumps) when both reach the same place;
* at the paravirt and alternative sites the pre section lists (``Section.sites``, read from
  the pre object's ``.parainstructions``/``.altinstructions`` at create): exactly the forms
  apply_paravirt/apply_alternatives may have written (livesplice.kernel.patchsites): a
  direct call of the function the running ``pv_ops`` slot holds, the replacement with the
  kernel's nops, or the original with its nop padding optimized. Not a wildcard: a site
  showing anything else is NO_MATCH naming the site kind and what was found.

A mismatch is NO_MATCH naming the function and the offset, before anything is loaded.
Two or more candidates that match are ambiguous (NO_MATCH), except copies of one function
the update does not replace whose every relocation field reaches the same address in all
of them (``static inline`` code emitted in several units: :func:`_interchangeable`).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from livesplice.arch.x86_64 import (
    MASK64,
    PC_RELATIVE,
    Insn,
    decode,
    decode_one,
    field_size,
    fields_masked,
    reloc_field,
    signed,
    symbol_address,
)
from livesplice.errors import NoMatch
from livesplice.kernel.patchsites import (
    X86_NOPS,
    BootFacts,
    Form,
    describe,
    original_form,
    site_forms,
)
from livesplice.update.format import PatchSite, Reloc, Section, Target

if TYPE_CHECKING:
    from livesplice.kernel.package import KernelJson


@dataclass
class KSym:
    """One /proc/kallsyms line."""

    addr: int
    type: str
    name: str
    module: str | None  # None: vmlinux


class KernelImage:
    """The running kernel: symbols (kallsyms) and memory (kcore)."""

    def __init__(self, syms: list[KSym], kcore_fd: int, loads: list[tuple[int, int, int]]):
        self.syms = syms
        self.by_name: dict[str, list[KSym]] = {}
        for s in syms:
            self.by_name.setdefault(s.name, []).append(s)
        self.fd = kcore_fd
        self.loads = loads  # (vaddr, offset, filesz)

    @classmethod
    def open(cls) -> KernelImage:
        """Read /proc/kallsyms and open /proc/kcore (as root: kptr_restrict hides addresses)."""
        syms: list[KSym] = []
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mod = parts[3].strip("[]") if len(parts) > 3 else None
                syms.append(KSym(int(parts[0], 16), parts[1], parts[2], mod))
        if syms and all(s.addr == 0 for s in syms[:100]):
            raise NoMatch("/proc/kallsyms shows no addresses", advice="run as root (kptr_restrict)")
        fd = os.open("/proc/kcore", os.O_RDONLY)
        try:
            loads = _kcore_loads(fd)
        except Exception:
            os.close(fd)
            raise
        return cls(syms, fd, loads)

    def read(self, addr: int, n: int) -> bytes:
        """``n`` bytes of kernel memory at ``addr``, through the PT_LOAD segment holding it."""
        for vaddr, off, size in self.loads:
            if vaddr <= addr and addr + n <= vaddr + size:
                return os.pread(self.fd, n, off + addr - vaddr)
        raise NoMatch(f"address {addr:#x} is not in /proc/kcore")

    def candidates(self, name: str, module: str | None) -> list[KSym]:
        """The symbols called ``name`` in ``module`` (None: vmlinux), in kallsyms order."""
        return [s for s in self.by_name.get(name, []) if s.module == module]

    def boot_facts(self) -> BootFacts:
        """The running ``pv_ops`` table and the paravirt special targets (kcore), which
        decide what apply_paravirt wrote at each site; a kernel without ``pv_ops``
        (no CONFIG_PARAVIRT) gets none, so its sites must show the original code."""

        def unique(name: str) -> int | None:
            c = self.candidates(name, None)
            return c[0].addr if len(c) == 1 else None

        table = unique("pv_ops")
        if table is None:
            return BootFacts()
        cache: dict[int, int] = {}

        def pv_op(slot: int) -> int:
            if slot not in cache:
                cache[slot] = int.from_bytes(self.read(table + 8 * slot, 8), "little")
            return cache[slot]

        return BootFacts(
            pv_op=pv_op,
            paravirt_nop=unique("_paravirt_nop"),
            paravirt_bug=unique("paravirt_BUG"),
            symbol=unique,
        )

    def sympos(self, sym: KSym) -> int:
        """Position among same-named symbols of its object (1-based), 0 when unique."""
        same = self.candidates(sym.name, sym.module)
        return 0 if len(same) <= 1 else same.index(sym) + 1


def _kcore_loads(fd: int) -> list[tuple[int, int, int]]:
    """(vaddr, file offset, size) of /proc/kcore's PT_LOAD segments: where each range of
    kernel memory is in the file (pyelftools reads the ELF header and program headers)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    f = os.fdopen(os.dup(fd), "rb", buffering=0)
    with f:
        try:
            elf = ELFFile(f)
            return [
                (seg["p_vaddr"], seg["p_offset"], seg["p_filesz"])
                for seg in elf.iter_segments()
                if seg["p_type"] == "PT_LOAD"
            ]
        except ELFError as e:
            raise NoMatch(f"/proc/kcore is not readable as ELF: {e}") from None


@dataclass
class KernelMatch:
    """Where the pre code runs in the kernel, and the sympos that tell same-named symbols apart."""

    functions: dict[str, int] = field(default_factory=dict)  # "obj.name" -> address
    func_sympos: dict[str, int] = field(default_factory=dict)
    klp_sympos: dict[str, int] = field(default_factory=dict)
    learned: dict[str, int] = field(default_factory=dict)  # symbol key -> address
    skipped: list[str] = field(default_factory=list)


class _Mismatch(Exception):
    def __init__(self, offset: int, why: str) -> None:
        super().__init__(why)
        self.offset = offset
        self.why = why


_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})


def _relock(pre: bytes, running: bytes) -> bytes:
    """Undo the kernel's uniprocessor rewrite of ``lock`` prefixes.

    On a machine with one CPU the kernel replaces every LOCK prefix listed in .smp_locks
    by a DS segment prefix (0xf0 -> 0x3e; arch/x86/kernel/alternative.c,
    alternatives_smp_unlock), and back when a second CPU comes up. Same length, same
    operation on one CPU: accept it where the pre code has the lock prefix.
    """
    if len(pre) != len(running) or pre == running:
        return running
    out = bytearray(running)
    for i, b in enumerate(pre):
        if b not in _PREFIXES:
            break
        if b == 0xF0 and out[i] == 0x3E:
            out[i] = 0xF0
    return bytes(out)


def _differ(p: int, pi: Insn, ri: Insn, rb: bytes) -> _Mismatch:
    return _Mismatch(
        p,
        f"expected {pi.raw.hex()} ({pi.mnemonic} {pi.op_str}), "
        f"found {rb.hex()} ({ri.mnemonic} {ri.op_str})",
    )


def compare_code(
    sec: Section,
    running: bytes,
    base: int,
    facts: BootFacts | None = None,
    trail: list[tuple[int, str, int]] | None = None,
) -> dict[str, int]:
    """Compare pre code with running bytes at ``base``; return learned key -> address.

    ``trail``, when given, receives every learned field in order (pre offset, key,
    address): the returned map keeps one address per key, the trail each reference.

    Decoding, branch targets, nops and relocation fields are the shared x86-64 rules
    (livesplice.arch.x86_64); what is kernel-only is the list of boot-time rewrites in this
    module's docstring. ``facts`` (the running pv_ops table) decides the paravirt forms.
    """
    facts = facts or BootFacts()
    groups = _site_groups(sec.sites)
    pre = sec.bytes
    for off, sites in groups.items():  # an unpatched alternative has its nops optimized
        n = _group_length(sites)
        pre = pre[:off] + original_form(sites, pre[off : off + n]) + pre[off + n :]
    # R_X86_64_NONE writes nothing (gcc marks a hot part's use of its .cold part with one,
    # inside a nop): no field to mask or learn, and it must not hide a real relocation of
    # the same instruction
    rel_at = {r.offset: r for r in sec.relocs if field_size(r.type)}
    learned: dict[str, int] = {}
    trail = trail if trail is not None else []
    pmap: dict[int, int] = {}  # pre offset -> running offset (instruction starts)
    branches: list[tuple[int, int, int]] = []  # (pre off, pre target, running target)
    p = r = 0
    site: tuple[int, int, int] | None = None  # (pre offset, end, running offset) of the
    # site whose original code is being compared: a mismatch inside it names the site
    while p < len(pre):
        pmap[p] = r
        if p in groups:
            n = _group_length(groups[p])
            hit = _match_rewritten(
                sec, groups[p], pre[p : p + n], running[r : r + n], base + r, facts, learned, trail
            )
            if hit is not None:
                if hit[0] is not None:
                    branches.append((p, hit[0], hit[1]))
                p, r = p + n, r + n
                continue
            site = (p, p + n, r)
        try:
            p, r = _compare_insn(pre, running, base, p, r, rel_at, learned, branches, trail)
        except _Mismatch as m:
            if site is None or not site[0] <= m.offset < site[1]:
                raise
            raise _site_mismatch(
                groups[site[0]], site[0], pre, running, site[2], base, facts
            ) from None
    for off, pt, rt in branches:
        if pt in pmap and rt != base + pmap[pt]:
            raise _Mismatch(
                off,
                f"branch goes to running {rt:#x}, expected "
                f"{base + pmap[pt]:#x} (pre offset {pt:#x})",
            )
    return learned


def _compare_insn(
    pre: bytes,
    running: bytes,
    base: int,
    p: int,
    r: int,
    rel_at: dict[int, Reloc],
    learned: dict[str, int],
    branches: list[tuple[int, int, int]],
    trail: list[tuple[int, str, int]],
) -> tuple[int, int]:
    """One pre instruction against the running code: the offsets after both."""
    pi = decode_one(pre[p:], p)
    ri = decode_one(running[r:], base + r)
    if pi is None:
        raise _Mismatch(p, "pre code does not decode")
    if ri is None:
        raise _Mismatch(p, f"running code does not decode ({running[r : r + 8].hex()})")
    plen = pi.size
    rel = next((rel_at[o] for o in range(p, p + plen) if o in rel_at), None)
    pb, rb = pi.raw, _relock(pi.raw, ri.raw)
    if rel is not None:
        sym = rel.symbol
        if sym == "__fentry__" and plen == 5 and ri.size == 5 and (rb[:1] == b"\xe8" or ri.is_nop):
            return p + 5, r + 5
        if sym == "__x86_return_thunk" and pb[:1] == b"\xe9" and rb[:1] in (b"\xc3", b"\xe9"):
            return p + 5, r + 5
        if sym.startswith(("__x86_indirect_thunk_", "__x86_indirect_call_thunk_")):
            return p + plen, r + plen  # rewritten into an indirect branch + padding
        field = [(rel.offset, rel.type)]
        if len(rb) != plen or fields_masked(pb, p, field) != fields_masked(rb, p, field):
            if sym.startswith("__SCT__") and len(rb) == plen:
                return p + plen, r + plen
            raise _differ(p, pi, ri, rb)
        pos = rel.offset - p
        addr = symbol_address(rel.type, reloc_field(rb, pos, rel.type), base + r + pos, rel.addend)
        if addr is not None:
            learned[sym] = addr
            trail.append((rel.offset, sym, addr))
        return p + plen, r + plen
    if pb == rb:
        t = pi.branch_target
        if t is not None:
            branches.append((p, t, ri.branch_target or 0))
        return p + plen, r + len(rb)
    if pi.mnemonic == ri.mnemonic and pi.branch_target is not None:
        pt, rt = pi.branch_target, ri.branch_target
        if pt is not None and rt is not None:
            branches.append((p, pt, rt))
            return p + plen, r + len(rb)
    raise _differ(p, pi, ri, rb)


# ---------------------------------------------------------------------------------------
# patch sites (livesplice.kernel.patchsites has the kernel's rules)
# ---------------------------------------------------------------------------------------


def _site_groups(sites: list[PatchSite]) -> dict[int, list[PatchSite]]:
    """Sites by offset: a paravirt call inside an ALTERNATIVE is listed by both tables,
    ALTERNATIVE_2 twice by .altinstructions; all of them rewrite the same bytes."""
    out: dict[int, list[PatchSite]] = {}
    for s in sites:
        out.setdefault(s.offset, []).append(s)
    return out


def _group_length(sites: list[PatchSite]) -> int:
    return max(s.length for s in sites)


def _match_rewritten(
    sec: Section,
    sites: list[PatchSite],
    pre: bytes,
    window: bytes,
    addr: int,
    facts: BootFacts,
    learned: dict[str, int],
    trail: list[tuple[int, str, int]],
) -> tuple[int | None, int] | None:
    """The first rewritten form of the sites that ``window`` (running bytes at ``addr``)
    shows, or None. A form whose branch must reach a place in this same section returns
    (pre offset of that place, running target) for the caller's branch check, otherwise
    (None, 0); learned relocation fields go into ``learned``."""
    for form in site_forms(sites, pre, facts):
        hit = _form_matches(sec, form, window, addr, facts)
        if hit is not None:
            check, more = hit
            learned.update({k: v for k, v in more.items() if k not in learned})
            trail.extend((sites[0].offset, k, v) for k, v in sorted(more.items()))
            return check
    return None


def _form_matches(
    sec: Section, form: Form, window: bytes, addr: int, facts: BootFacts
) -> tuple[tuple[int | None, int], dict[str, int]] | None:
    code = bytearray(form.code)
    got = bytearray(window)
    if len(got) != len(code):
        return None
    target: int | None = None
    if form.branch is not None:
        pos, width = form.branch
        if code[0] == 0xE9 and got[0] == 0xEB and got[2:5] == X86_NOPS[3]:
            # recompute_jump chose the 2-byte jmp (+ a 3-byte nop)
            target = addr + 2 + signed(got[1], 8)
            got[1:5] = code[1:5]
            got[0] = 0xE9
        elif got[:1] == code[:1]:
            target = (
                addr + pos + width + signed(int.from_bytes(got[pos : pos + width], "little"), 32)
            ) & MASK64
            got[pos : pos + width] = code[pos : pos + width]
        else:
            return None
    masks = [(r.offset, r.type) for r in form.masked]
    if fields_masked(bytes(got), 0, masks) != fields_masked(bytes(code), 0, masks):
        return None
    learned: dict[str, int] = {}
    for r in form.masked:
        a = symbol_address(r.type, reloc_field(window, r.offset, r.type), addr + r.offset, r.addend)
        if a is not None and r.type not in PC_RELATIVE:  # PC-relative ones were not re-aimed
            learned[r.symbol] = a
    if target is None:
        return (None, 0), learned
    if form.target is not None:
        return ((None, 0), learned) if target == form.target else None
    rel = form.target_reloc
    assert rel is not None
    # the replacement's call/jmp field: S + A - P with P = field, so it reaches S + A + 4
    reach = rel.addend + 4
    if rel.symbol == sec.key:
        return (reach, target), learned
    known = facts.symbol(rel.symbol) if facts.symbol is not None else None
    if known is not None and (known + reach) & MASK64 != target:
        return None
    learned[rel.symbol] = (target - reach) & MASK64
    return (None, 0), learned


def _site_mismatch(
    sites: list[PatchSite],
    off: int,
    pre: bytes,
    running: bytes,
    r: int,
    base: int,
    facts: BootFacts,
) -> _Mismatch:
    n = _group_length(sites)
    found = running[r : r + n]
    insns = ", ".join(f"{i.mnemonic} {i.op_str}".strip() for i in decode(found, base + r))
    accepted = ["the original " + pre[off : off + n].hex()]
    accepted += [f.what for f in site_forms(sites, pre[off : off + n], facts)]
    return _Mismatch(
        off,
        f"{describe(sites)}, {n} bytes: found {found.hex()} ({insns}); "
        f"the kernel may write there only: {'; '.join(accepted)}",
    )


Trail = list[tuple[int, str, int]]  # every learned relocation field: (pre offset, key, address)


def _interchangeable(sec: Section, replaced: Collection[str | None], trails: list[Trail]) -> bool:
    """Whether same-named functions that all matched ``sec`` are copies of one another, so
    that shipped code may call any of them: a ``static inline`` function gcc emitted out of
    line in several units (``pfn_swap_entry_to_page``). Matching already showed that every
    copy has ``sec``'s bytes outside relocation fields; they behave the same only if, in
    addition, every relocation field reaches the same address in all of them (``trails``,
    one per copy, compared field by field). A copy that reads its own unit's data (static
    locals, strings, jump tables) has fields that differ: refused. Never for a function
    the update replaces (``replaced``: the pre keys replacement sections name): which copy
    livepatch redirects is then the point, so an ambiguity stays an error."""
    if sec.key in replaced or len(trails) < 2:
        return False
    return all(t == trails[0] for t in trails[1:])


def run_pre_match_kernel(
    image: KernelImage, targets: list[Target], kernel: KernelJson
) -> KernelMatch:
    """Match every pre function; decide sympos of changed functions and klp symbols."""
    from livesplice.kernel.klp import object_of, running_name

    result = KernelMatch()
    problems: list[str] = []
    facts = image.boot_facts()
    for t in targets:
        obj = object_of(t)
        module = None if obj == "vmlinux" else obj
        if module is not None and not any(s.module == module for s in image.syms):
            result.skipped.append(f"{obj}: not loaded; livepatch patches it when it loads")
            continue
        replaced = {s.replaces for s in t.sections if s.role == "replacement"}
        for sec in (s for s in t.sections if s.role == "pre" and s.executable):
            name = running_name(t, sec.key)
            cands = [c for c in image.candidates(name, module) if c.type in "tT"]
            if not cands:
                problems.append(f"{obj}: {name}: no such function in the running kernel")
                continue
            ok: list[tuple[KSym, dict[str, int]]] = []
            trails: list[Trail] = []
            fails: list[str] = []
            for c in cands:
                try:
                    running = image.read(c.addr, sec.size + 64)
                    trail: Trail = []
                    ok.append((c, compare_code(sec, running, c.addr, facts, trail)))
                    trails.append(trail)
                except _Mismatch as m:
                    fails.append(f"{name}+{m.offset:#x} at {c.addr:#x}: {m.why}")
            if len(ok) > 1 and _interchangeable(sec, replaced, trails):
                ok = ok[:1]  # the first copy in kallsyms order; any would do
            if len(ok) != 1:
                if not ok:
                    problems.extend(fails[:3])
                else:
                    problems.append(f"{obj}: {name}: {len(ok)} candidates match (ambiguous)")
                continue
            cand, learned = ok[0]
            result.functions[f"{obj}.{name}"] = cand.addr
            result.func_sympos[f"{obj}.{name}"] = image.sympos(cand)
            result.learned.setdefault(sec.key, cand.addr)
            for k, v in learned.items():
                result.learned.setdefault(k, v)
    if problems:
        raise NoMatch(
            "the running kernel's code is not what this update was built from",
            problems,
            "build the update from the exact source, configuration and compiler of the "
            "running kernel (`uname -r`, /proc/version)",
        )
    for ks in kernel.get("klp_symbols", []):
        base = f"{ks['object']}.{ks['name']}"
        module = None if ks["object"] == "vmlinux" else ks["object"]
        cands = image.candidates(ks["name"], module)
        if module is not None and not any(s.module == module for s in image.syms):
            if ks["count"] > 1:  # from the shipped .ko; nothing to match against yet
                raise NoMatch(
                    f"{ks['object']} has {ks['count']} symbols named {ks['name']} and is not "
                    "loaded: its sympos cannot be decided",
                    advice=f"load {ks['object']} first, then apply the update",
                )
            continue
        # the running kernel's own count: create may not know it (Debian ships System.map
        # only in the -dbg package, so a lab tree counts 0 for every vmlinux symbol)
        if len(cands) <= 1:
            continue
        learn = ks.get("learn")
        if learn:  # [section key, offset], as read_kernel_members checked
            base_addr = result.learned.get(str(learn[0]))
            addr = base_addr + int(learn[1]) if base_addr is not None else None
        else:
            addr = result.learned.get(ks["key"])
        hit = [c for c in cands if c.addr == addr]
        if not hit:
            raise NoMatch(
                f"cannot decide which of {len(cands)} symbols named {ks['name']} the update uses",
                [
                    f"{ks['object']}: {ks['name']}: matching learned "
                    f"{hex(addr) if addr else 'no address'}"
                ],
            )
        result.klp_sympos[base] = image.sympos(hit[0])
    return result
