"""Generate the livepatch module of a kernel update.

The module is two parts, built by kbuild against the prepared tree (so vermagic and symbol
CRCs are the running kernel's):

* ``code.S``: the shipped post code and data of every kernel :class:`Target`, as bytes, with
  one ``.reloc`` directive per relocation (the exact ABI type: ``R_X86_64_32S`` cannot be
  spelled with ``.long``). Relocation symbols are

  - a label of a shipped section (``lsp_N`` + offset),
  - an exported symbol by name (normal relocation: modpost records its CRC),
  - ``.klp.sym.<obj>.<name>,<sympos>`` for everything else (static and non-exported
    symbols, and symbols of the patched module itself so that it may load later); these
    are turned into livepatch relocations after the link (:mod:`livesplice.kernel.elfedit`).

  The ``call __fentry__`` at a function's entry becomes a 5-byte nop: the replacement is
  reached through ftrace from the old function and is never traced itself.
  ``code.S`` is assembled without objtool (``OBJECT_FILES_NON_STANDARD``): it is compiler
  output objtool already processed once.
* ``glue.c``: one ``klp_func`` per changed function, one ``klp_object`` per patched object
  (``vmlinux`` or a module name), one ``klp_patch`` (the shape of
  samples/livepatch/livepatch-sample.c). ``old_sympos`` comes from a module parameter
  (``sympos=``) that apply fills in from run-pre matching; hooks become klp callbacks.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from livesplice.arch.x86_64 import field_size
from livesplice.errors import BuildFailed, PatchRefused
from livesplice.update.format import Hook, Section, Target

FENTRY = "__fentry__"
# sections the loader finds by name (module_finalize: the paravirt and alternative sites)
SPECIAL_TABLES = (
    "__bug_table",
    "__jump_table",
    "__ex_table",
    ".parainstructions",
    ".altinstructions",
    ".altinstr_replacement",
)
NOP5 = bytes.fromhex("0f1f440000")  # the nop ftrace writes over call __fentry__ (x86 ideal nop)

# livesplice hook kinds -> klp_callbacks members (include/linux/livepatch.h)
CALLBACKS = {
    "pre_apply": "pre_patch",
    "post_apply": "post_patch",
    "pre_reverse": "pre_unpatch",
    "post_reverse": "post_unpatch",
}


@dataclass
class SymbolTables:
    """What create knows about the running kernel's symbols (from the prepared tree)."""

    exports: dict[str, str]  # exported name -> "vmlinux" or module name
    vmlinux: dict[str, int]  # name -> how many symbols of that name System.map has
    modules: dict[str, dict[str, int]] = field(default_factory=dict)  # per module .ko


@dataclass
class KlpSymbol:
    """A symbol the module reaches through a livepatch relocation."""

    obj: str  # "vmlinux" or module name
    name: str
    count: int  # same-named symbols in obj; > 1: apply decides sympos by matching
    key: str  # the update's symbol key (for matching)
    # where run-pre matching learns its address: (section key, offset of the symbol in it)
    learn: tuple[str, int] | None = None

    @property
    def base(self) -> str:
        """``object.name``: the key of the symbol in the plan and in ``.klp.sym`` names."""
        return f"{self.obj}.{self.name}"


@dataclass
class ModulePlan:
    """Everything the generated module needs: its name, the klp symbols to relocate through, and
    the replaced functions split between livepatch and Ksplice's own path."""

    name: str  # module name: livesplice_<id>
    klp_symbols: dict[str, KlpSymbol]  # base -> symbol
    funcs: list[tuple[str, str, str]]  # (obj, function name, label) in sympos order
    # functions without an ftrace entry, switched by Ksplice's own mechanism
    # (livesplice.kernel.ksplice): (obj, function name, label, size) in ksplice_addr= order
    ksplice: list[tuple[str, str, str, int]] = field(default_factory=list)


def module_name(update_id: str) -> str:
    """The module's name for an update: ``livesplice_<id>`` with ``-`` made ``_``, as module
    names allow (it is also the /sys/kernel/livepatch directory)."""
    return "livesplice_" + update_id.replace("-", "_")


def load_exports(ksrc: Path) -> dict[str, str]:
    """Exported symbol -> the object exporting it ("vmlinux" or a module), from
    Module.symvers: what the module loader resolves by itself, without livepatch."""
    exports: dict[str, str] = {}
    symvers = ksrc / "Module.symvers"
    for line in symvers.read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            exports[parts[1]] = Path(parts[2]).name
    return exports


def load_symbol_tables(ksrc: Path, modules: list[str]) -> SymbolTables:
    """The running kernel's symbols as the prepared tree describes them: exports (a symbol not
    exported must go through a klp relocation) and how many same-named symbols exist (more
    than one: sympos must be decided)."""
    exports = load_exports(ksrc)
    vmlinux: dict[str, int] = {}
    smap = find_system_map(ksrc)
    if smap is not None:
        for line in smap.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3:
                vmlinux[parts[2]] = vmlinux.get(parts[2], 0) + 1
    mods: dict[str, dict[str, int]] = {}
    for m in modules:
        ko = find_module_ko(ksrc, m)
        mods[m] = module_symbol_counts(ko) if ko is not None else {}
    return SymbolTables(exports, vmlinux, mods)


def find_system_map(ksrc: Path) -> Path | None:
    """The tree's System.map, or one under the lab's unpacked root (``root/boot``): without
    one every vmlinux symbol counts 0 and apply's matching decides its sympos."""
    for p in [ksrc / "System.map", *sorted((ksrc.parent / "root" / "boot").glob("System.map-*"))]:
        if p.exists():
            return p
    return None


def find_module_ko(ksrc: Path, module: str) -> Path | None:
    """The shipped .ko of ``module`` (lab: root/lib/modules/<release>/...)."""
    for base in (ksrc.parent / "root" / "lib" / "modules", ksrc):
        if base.is_dir():
            name = module.replace("_", "[_-]")
            for ko in sorted(base.rglob("*.ko")):
                if re.fullmatch(name + r"\.ko", ko.name):
                    return ko
    return None


def module_symbol_counts(ko: Path) -> dict[str, int]:
    """Defined symbols of a module's .ko by name, with how many of each: same-named statics need
    a sympos."""
    from livesplice.kernel.elfedit import ElfRel

    counts: dict[str, int] = {}
    for name, _info, _o, shndx, _v, _s in ElfRel(ko.read_bytes()).symbols():
        if name and shndx != 0:
            counts[name] = counts.get(name, 0) + 1
    return counts


def object_of(target: Target) -> str:
    """The livepatch object a target is in: ``vmlinux`` for the kernel itself, else the module's
    name."""
    return "vmlinux" if target.kind == "kernel" else target.name


def running_name(target: Target, key: str) -> str:
    """The kallsyms name of a pre symbol key (``unit:.text.foo`` -> ``foo``)."""
    info = target.symbols.get(key)
    name = info.name if info is not None else key.rsplit(":", 1)[-1]
    for prefix in (
        ".text.unlikely.",
        ".text.",
        ".rodata.",
        ".data..read_mostly.",
        ".data.",
        ".bss.",
    ):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def is_cold(name: str) -> bool:
    """Whether ``name`` is a gcc ``.cold`` part (kdiff's rule, imported lazily)."""
    from livesplice.kernel.kdiff import is_cold as cold

    return cold(name)


def plan_module(
    update_id: str,
    targets: list[Target],
    tables: SymbolTables,
    specials: dict[str, list[Section]] | None = None,
    learn: dict[str, tuple[str, int]] | None = None,
) -> ModulePlan:
    """Which symbols become klp symbols, and the functions in ``sympos=`` order.

    ``specials``: per target, the special table entries (kdiff) that travel with the code;
    ``learn``: symbol key -> (section key, offset) for symbols named inside a section.
    """
    plan = ModulePlan(module_name(update_id), {}, [])
    specials = specials or {}
    for t in targets:
        obj = object_of(t)
        shipped = _shipped_keys(t, specials.get(t.name, []))
        for s in [*t.sections, *specials.get(t.name, [])]:
            if s.role == "replacement" and not is_cold(s.name):
                plan.funcs.append((obj, s.name, shipped[s.key][0]))
            if s.role == "pre":
                continue
            for r in s.relocs:
                if r.symbol in shipped or r.symbol == FENTRY:
                    continue
                name = running_name(t, r.symbol)
                info = t.symbols.get(r.symbol)
                is_local = info is None or info.binding == "local" or info.defined
                exporter = tables.exports.get(name)
                if (
                    not is_local
                    and exporter is not None
                    and (exporter == "vmlinux" or exporter != obj)
                ):
                    continue  # a normal relocation
                sym_obj = obj
                if exporter == "vmlinux" and obj != "vmlinux":
                    continue
                if obj != "vmlinux" and not is_local and name in tables.vmlinux:
                    sym_obj = "vmlinux"  # non-exported vmlinux global used by module code
                counts = tables.vmlinux if sym_obj == "vmlinux" else tables.modules.get(obj, {})
                plan.klp_symbols.setdefault(
                    f"{sym_obj}.{name}",
                    KlpSymbol(
                        sym_obj, name, counts.get(name, 0), r.symbol, (learn or {}).get(r.symbol)
                    ),
                )
    return plan


def _module_sections(t: Target, extra: list[Section]) -> list[Section]:
    return [*(x for x in t.sections if x.role != "pre"), *extra]


def _shipped_keys(t: Target, extra: list[Section] | None = None) -> dict[str, tuple[str, int]]:
    """Symbol key -> (label, offset) for everything the module defines."""
    out: dict[str, tuple[str, int]] = {}
    for i, s in enumerate(_module_sections(t, extra or [])):
        label = f"lsp_{_ident(t.name)}_{i}"
        out.setdefault(s.key, (label, 0))
        for k, off in s.symbols.items():
            out.setdefault(k, (label, off))
    return out


def _ident(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def reloc_symbol(
    plan: ModulePlan,
    t: Target,
    key: str,
    shipped: dict[str, tuple[str, int]],
    sympos: dict[str, int],
) -> tuple[str, int]:
    """What a relocation in shipped code refers to: a shipped label, a ``.klp.sym`` symbol (a
    symbol the module cannot link against: livepatch resolves it with its sympos), or the
    plain name for an exported symbol."""
    if key in shipped:
        return shipped[key]
    name = running_name(t, key)
    for base, ks in plan.klp_symbols.items():
        if ks.key == key or (ks.name == name and ks.obj in (object_of(t), "vmlinux")):
            return f'".klp.sym.{base},{sympos.get(base, 0)}"', 0
    return name, 0


def write_code_asm(
    plan: ModulePlan,
    targets: list[Target],
    sympos: dict[str, int],
    specials: dict[str, list[Section]] | None = None,
) -> str:
    """The assembler file of the module's shipped code and data: every section as bytes with its
    relocations written as symbol references, so kbuild assembles and links it like any module
    object."""
    lines = ["/* generated by livesplice: shipped code and data of the update */"]
    # module -> (label, offset, size) of each livepatch relocation field against it
    fields: dict[str, list[tuple[str, int, int]]] = {}
    for t in targets:
        extra = (specials or {}).get(t.name, [])
        shipped = _shipped_keys(t, extra)
        for i, s in enumerate(_module_sections(t, extra)):
            label = f"lsp_{_ident(t.name)}_{i}"
            data = bytearray(s.bytes)
            relocs = list(s.relocs)
            for r in s.relocs:
                if r.symbol == FENTRY and r.offset >= 1 and data[r.offset - 1] == 0xE8:
                    data[r.offset - 1 : r.offset + 4] = NOP5
                    relocs.remove(r)
            if s.name in SPECIAL_TABLES:
                # one entry of a kernel table: the exact section name, no padding, no symbol
                # type (the loader finds __bug_table/__jump_table/__ex_table by name)
                lines.append(f'.section {s.name},"aw",@progbits')
                lines.append(f"{label}:")
            else:
                kind = _section_kind(s)
                lines.append(f'.section .{kind}.livesplice.{label},"{_flags(s)}",@{_type(s)}')
                lines.append(f".balign {max(s.align, 1)}")
                lines.append(f".globl {label}")
                lines.append(f".type {label},@{'function' if s.executable else 'object'}")
                lines.append(f"{label}:")
            if s.data:
                for off in range(0, len(data), 16):
                    lines.append(".byte " + ",".join(f"0x{b:02x}" for b in data[off : off + 16]))
            else:
                lines.append(f".zero {s.size}")
            if s.name not in SPECIAL_TABLES:
                lines.append(f".size {label},{s.size}")
            for r in relocs:
                sym, base_off = reloc_symbol(plan, t, r.symbol, shipped, sympos)
                addend = r.addend + base_off
                lines.append(f".reloc {label}+{r.offset},{r.type},{sym}{addend:+d}")
                obj = _klp_module_of(sym)
                if obj is not None:
                    fields.setdefault(obj, []).append((label, r.offset, field_size(r.type)))
    for obj, where in sorted(fields.items()):
        lines += [
            '.section .rodata.livesplice.klp_clear,"a",@progbits',
            ".balign 8",
            f".globl {clear_table(obj)}",
            f"{clear_table(obj)}:",
            *[f".quad {label}+{off}, {size}" for label, off, size in where],
            ".quad 0, 0",
        ]
    return "\n".join(lines) + "\n"


def clear_table(obj: str) -> str:
    """The label of the (address, size) table of ``obj``'s livepatch relocation fields."""
    return f"lsp_klp_clear_{_ident(obj)}"


def _klp_module_of(sym: str) -> str | None:
    """The module a ``".klp.sym.<obj>.<name>,<pos>"`` relocation symbol names; None for
    vmlinux and ordinary symbols."""
    if not sym.startswith('".klp.sym.'):
        return None
    obj = sym[len('".klp.sym.') :].split(".", 1)[0]
    return None if obj == "vmlinux" else obj


def modules_with_klp_relocations(code_asm: str) -> list[str]:
    """The modules whose fields ``write_code_asm`` listed in a clear table (glue.c clears
    them when the module goes away: see :data:`CLEAR_RELOCS_C`)."""
    prefix = ".globl lsp_klp_clear_"
    return sorted(line[len(prefix) :] for line in code_asm.splitlines() if line.startswith(prefix))


# Linux 6.1 writes a livepatch module's relocations against a module when that module
# loads (klp_module_coming -> apply_relocate_add), but never clears them when it goes:
# x86's apply_relocate_add then refuses the next load ("Skipping invalid relocation
# target, existing value is nonzero") and the module cannot be loaded again while the
# update is applied. Linux 6.3 added clear_relocate_add for this (commit 0c05e7bd2d01,
# "livepatch,x86: Clear relocation targets on a module removal"); the update does the
# same from the module object's post_unpatch callback, which klp_module_going calls
# after unpatching the object, under klp_mutex (the lock order of relocation writing).
# text_poke() and text_mutex are not exported: reached by livepatch relocations, as
# ksplice.c reaches them.
CLEAR_RELOCS_C = r"""
asm(".pushsection .data..lsp_klp_clear,\"aw\",@progbits\n"
    ".balign 8\n"
    "lsp_clear_text_poke: .quad 0\n"
    ".reloc lsp_clear_text_poke, R_X86_64_64, \".klp.sym.vmlinux.text_poke,0\"\n"
    "lsp_clear_text_mutex: .quad 0\n"
    ".reloc lsp_clear_text_mutex, R_X86_64_64, \".klp.sym.vmlinux.text_mutex,0\"\n"
    ".popsection\n");
extern void *(*lsp_clear_text_poke)(void *addr, const void *opcode, size_t len);
extern struct mutex *lsp_clear_text_mutex;
struct lsp_klp_field { void *loc; unsigned long size; };

static void lsp_klp_clear(const struct lsp_klp_field *f)
{
	static const char zero[8];

	if (!lsp_clear_text_poke || !lsp_clear_text_mutex)
		return;
	mutex_lock(lsp_clear_text_mutex);
	for (; f->loc; f++)
		lsp_clear_text_poke(f->loc, zero, f->size);
	mutex_unlock(lsp_clear_text_mutex);
}
"""


def _section_kind(s: Section) -> str:
    if s.executable:
        return "text"
    if not s.data:
        return "bss"
    return "rodata" if s.readonly else "data"


def _flags(s: Section) -> str:
    return "ax" if s.executable else ("a" if s.readonly else "aw")


def _type(s: Section) -> str:
    return "nobits" if not s.data else "progbits"


def write_glue_c(
    plan: ModulePlan,
    targets: list[Target],
    hooks: list[Hook],
    update_id: str,
    description: str,
    cleared: Sequence[str] = (),
) -> str:
    """The C glue of the module: the klp_func/klp_object/klp_patch tables, the callbacks for
    hooks and, for the Ksplice path, the tables its stop_machine code reads. ``cleared``:
    modules whose relocation fields the module object's post_unpatch callback clears
    (:func:`modules_with_klp_relocations` of code.S)."""
    out = [
        "/* generated by livesplice: the livepatch glue of one update */",
        "#include <linux/kernel.h>",
        "#include <linux/module.h>",
        "#include <linux/livepatch.h>",
        "#include <linux/mutex.h>",
        "#include <linux/rcupdate.h>",
        "",
    ]
    if cleared:
        out.append(CLEAR_RELOCS_C)
    for _obj, _name, label in plan.funcs:
        out.append(f"extern char {label}[];")
    n = len(plan.funcs)
    out += [
        "",
        f"static unsigned long lsp_sympos[{max(n, 1)}];",
        "static int lsp_nsympos;",
        "module_param_array_named(sympos, lsp_sympos, ulong, &lsp_nsympos, 0400);",
        'MODULE_PARM_DESC(sympos, "old_sympos of each function (from run-pre matching)");',
        "",
    ]
    hook_labels: dict[str, str] = {}
    for h in hooks:
        t = next(x for x in targets if x.name == h.target)
        label = _shipped_keys(t)[h.key][0]
        hook_labels[h.kind] = label
        ret = "int" if h.kind == "pre_apply" else "void"
        out.append(f"extern {ret} {label}(void);")
    objs = sorted({o for o, _, _ in plan.funcs} | ({"vmlinux"} if plan.ksplice else set()))
    if plan.ksplice:
        from livesplice.kernel.ksplice import glue_tables

        code = [
            (f"lsp_{_ident(t.name)}_{i}", s.size)
            for t in targets
            for i, s in enumerate(_module_sections(t, []))
            if s.executable
        ]
        out += glue_tables(plan.ksplice, code)
    for oi, obj in enumerate(objs):
        out.append(f"static struct klp_func lsp_funcs_{oi}[] = {{")
        for obj2, name, label in plan.funcs:
            if obj2 == obj:
                out.append(f'\t{{ .old_name = "{name}", .new_func = {label} }},')
        out += ["\t{ }", "};"]
    for kind, label in hook_labels.items():
        member = CALLBACKS.get(kind)
        if member is None:
            continue
        if kind == "pre_apply":
            out.append(
                f"static int lsp_cb_{member}(struct klp_object *obj) {{ return {label}(); }}"
            )
        else:
            out.append(f"static void lsp_cb_{member}(struct klp_object *obj) {{ {label}(); }}")
    for oi, obj in enumerate(objs):
        if _ident(obj) in cleared:
            user = "lsp_cb_post_unpatch(obj); " if oi == 0 and "post_reverse" in hook_labels else ""
            out += [
                f"extern const struct lsp_klp_field {clear_table(obj)}[];",
                f"static void lsp_klp_clear_cb_{oi}(struct klp_object *obj)",
                f"{{ {user}lsp_klp_clear({clear_table(obj)}); }}",
            ]
    out.append("static struct klp_object lsp_objs[] = {")
    for oi, obj in enumerate(objs):
        name = "NULL" if obj == "vmlinux" else f'"{obj}"'
        cbs = "".join(
            f" .{CALLBACKS[k]} = lsp_cb_{CALLBACKS[k]}," for k in hook_labels if k in CALLBACKS
        )
        if _ident(obj) in cleared:  # its post_unpatch clears, after the user's hook if any
            cbs = cbs.replace(" .post_unpatch = lsp_cb_post_unpatch,", "") if oi == 0 else ""
            cbs += f" .post_unpatch = lsp_klp_clear_cb_{oi},"
        cb = f" .callbacks = {{{cbs} }}," if cbs and (oi == 0 or _ident(obj) in cleared) else ""
        if plan.ksplice and obj == "vmlinux":  # create refuses hooks beside the Ksplice path
            cb = " .callbacks = { .pre_patch = lsp_ksplice_apply },"
        out.append(f"\t{{ .name = {name}, .funcs = lsp_funcs_{oi},{cb} }},")
    out += ["\t{ }", "};", ""]
    out += [
        "static struct klp_patch lsp_patch = {",
        "\t.mod = THIS_MODULE,",
        "\t.objs = lsp_objs,",
        "};",
        "",
        "static int __init lsp_init(void)",
        "{",
    ]
    for oi, obj in enumerate(objs):
        j = 0
        for k, (obj2, _name, _label) in enumerate(plan.funcs):
            if obj2 == obj:
                out.append(f"\tlsp_funcs_{oi}[{j}].old_sympos = lsp_sympos[{k}];")
                j += 1
    out += [
        "\treturn klp_enable_patch(&lsp_patch);",
        "}",
        "",
        # New code may queue RCU callbacks that are functions of this module
        # (call_rcu(&p->rcu, new_fn)); rmmod after undo must not free them while queued
        # (Documentation/RCU/rcubarrier.rst: a module using call_rcu waits in its exit).
        "static void __exit lsp_exit(void)",
        "{",
        "\trcu_barrier();",
        "}",
        "",
        "module_init(lsp_init);",
        "module_exit(lsp_exit);",
        'MODULE_LICENSE("GPL");',
        'MODULE_INFO(livepatch, "Y");',
        f'MODULE_INFO(livesplice_id, "{update_id}");',
        f"MODULE_DESCRIPTION({_c_string(description)});",
    ]
    return "\n".join(out) + "\n"


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"')[:200] + '"'


def build_module(
    tree: Path,
    moddir: Path,
    plan: ModulePlan,
    targets: list[Target],
    hooks: list[Hook],
    update_id: str,
    description: str,
    env: dict[str, str],
    specials: dict[str, list[Section]] | None = None,
) -> bytes:
    """Generate, build (kbuild, M=moddir against ``tree``) and finish the module; its bytes."""
    moddir.mkdir(parents=True, exist_ok=True)
    sympos = {b: 0 for b, s in plan.klp_symbols.items() if s.count <= 1}
    code = write_code_asm(plan, targets, sympos, specials)
    (moddir / "code.S").write_text(code)
    cleared = modules_with_klp_relocations(code)
    glue = write_glue_c(plan, targets, hooks, update_id, description, cleared)
    (moddir / "glue.c").write_text(glue)
    extra = ""
    if plan.ksplice:
        from livesplice.kernel.ksplice import copy_module_source

        extra = " " + copy_module_source(moddir)
    (moddir / "Kbuild").write_text(
        f"obj-m := {plan.name}.o\n"
        f"{plan.name}-y := glue.o code.o{extra}\n"
        "# compiler output objtool has already processed once\n"
        "OBJECT_FILES_NON_STANDARD_code.o := y\n"
    )
    # modpost: .klp.sym.* symbols are undefined until they become livepatch symbols
    env = dict(env, KBUILD_MODPOST_WARN="1")
    cmd = ["make", "-C", str(tree), f"M={moddir}", "modules"]
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = done.stdout.decode(errors="replace")
    (moddir / "build.log").write_text(text)
    ko = moddir / f"{plan.name}.ko"
    if done.returncode != 0 or not ko.exists():
        raise BuildFailed(
            "building the livepatch module failed",
            [" ".join(cmd), *text.splitlines()[-25:]],
            f"generated sources and log in {moddir} (use --keep-tmp to keep them)",
        )
    undefined = [
        m.group(1)
        for m in re.finditer(r'WARNING: modpost: "([^"]+)" \[[^\]]*\] undefined!', text)
        if not m.group(1).startswith(".klp.sym.")
    ]
    if undefined:
        raise PatchRefused(
            "the replacement code references symbols the module cannot resolve",
            [f"{u}: undefined in the livepatch module" for u in undefined],
            "this is a livesplice limitation; please report it with the patch",
        )
    stripped = moddir / "stripped.ko"
    strip = shutil.which("strip") or "strip"
    subprocess.run([strip, "--strip-debug", "-o", str(stripped), str(ko)], check=True)
    from livesplice.kernel.elfedit import make_klp_relocations

    return make_klp_relocations(stripped.read_bytes())
