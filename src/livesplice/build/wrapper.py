"""The compiler wrapper: runs in place of gcc/cc/g++/c++ (and ``ar``) during a build.

The builder (:mod:`livesplice.build.builder`) puts a directory of shims first in PATH and points
CC/CXX at it. Each shim is a two-line shell script::

    exec PYTHON -I -S .../wrapper.py TOOL FALLBACK SHIM_DIR "$0" "$@"

so this file runs as a plain script, once per compile. It must start fast: only built-in
modules are imported at the top (``-S`` skips ``site``; no pathlib, subprocess, re, shlex).

For a C/C++ compile it adds ``-ffunction-sections -fdata-sections`` (each function and each data
object in its own section, which is what lets the diff compare and ship them one by one) and
``-g`` when the build has no ``-g*`` of its own (the DWARF type-layout check needs it; gcc
documents that -g does not change the code it emits, see ``-fcompare-debug`` in the gcc manual).
It appends one JSON line per event to ``$LIVESPLICE_BUILD_LOG`` and then runs the real tool.

Decisions:

* ``-E`` / ``-M`` / ``-MM`` / ``-fsyntax-only``: passed through untouched, nothing recorded
  (no object comes out).
* ``-S``: the flags ARE added (a build that compiles to assembly and assembles in a second step
  must still end up with one section per function) and a ``to_asm`` event maps the ``.s`` back to
  its C source, so the builder does not mistake the generated ``.s`` for hand-written assembly.
* Compile and link in one command (``cc -o prog prog.c``, make's built-in rule): gcc would put
  the objects in temporary files and delete them, so the wrapper splits the command: it compiles
  each source to ``<stem>-ls<N>-<output name>.o`` next to the output and links those (the
  source-stem prefix means autoconf's ``rm -rf conftest*`` clean-up removes the ones configure
  makes for ``cc conftest.c`` -> a.out).
* Assembly (``.s``, ``.S``, ``.sx``): recorded with language ``asm``; no flags added (``-g`` would
  add assembler-level line tables that the unpatched build did not have).
* The real tool runs with the shim directory removed from PATH, so a compiler launcher found
  after the shims (ccache's ``/usr/lib/ccache/gcc``) does not find the shim again and loop.

Event lines (all paths absolute, as the build named them relative to its cwd)::

    {"kind": "compile", "source", "object", "language", "argv", "cwd", "real", "split"}
    {"kind": "to_asm", "source", "output", "language", "argv", "cwd"}
    {"kind": "link", "output", "inputs", "shared", "relocatable", "argv", "cwd", "real"}
    {"kind": "archive", "archive", "operation", "members", "argv", "cwd"}
"""

from __future__ import annotations

import fcntl
import os
import sys

LOG_ENV = "LIVESPLICE_BUILD_LOG"
REAL_ENV_PREFIX = "LIVESPLICE_REAL_"  # LIVESPLICE_REAL_GCC=/opt/gcc/bin/gcc overrides PATH lookup

EXTRA_COMPILE_FLAGS = ("-ffunction-sections", "-fdata-sections")
PREFIX_MAP_ENV = "LIVESPLICE_PREFIX_MAP"  # OLD=NEW for -ffile-prefix-map (reproducible debug info)

C_SUFFIXES = {".c": "c", ".i": "c"}
CXX_SUFFIXES = {
    ".cc": "c++",
    ".cp": "c++",
    ".cxx": "c++",
    ".cpp": "c++",
    ".CPP": "c++",
    ".c++": "c++",
    ".C": "c++",
    ".ii": "c++",
}
ASM_SUFFIXES = {".s": "asm", ".S": "asm", ".sx": "asm"}
HEADER_SUFFIXES = {".h", ".hh", ".hpp", ".hxx", ".H", ".h++", ".tcc"}
# gcc -x LANGUAGE values -> our language names
# (gcc manual, "Options Controlling the Kind of Output")
X_LANGUAGES = {
    "c": "c",
    "cpp-output": "c",
    "c++": "c++",
    "c++-cpp-output": "c++",
    "assembler": "asm",
    "assembler-with-cpp": "asm",
}

# gcc options whose argument is the NEXT word (gcc manual option summary); anything else that
# starts with "-" is self-contained, so its neighbour is an input file.
OPTIONS_WITH_ARGUMENT = frozenset(
    {
        "-o",
        "-x",
        "-I",
        "-D",
        "-U",
        "-include",
        "-imacros",
        "-iprefix",
        "-iwithprefix",
        "-iwithprefixbefore",
        "-isystem",
        "-isysroot",
        "-idirafter",
        "-iquote",
        "-imultilib",
        "-MF",
        "-MT",
        "-MQ",
        "-L",
        "-l",
        "-T",
        "-u",
        "-z",
        "-e",
        "-B",
        "-A",
        "-Xlinker",
        "-Xassembler",
        "-Xpreprocessor",
        "-aux-info",
        "--param",
        "-dumpbase",
        "-dumpdir",
        "-specs",
        "-wrapper",
        "--sysroot",
        "-Xclang",
        "-target",
    }
)
# Options after which gcc produces no object: preprocess only, dependency lists, queries.
NO_OUTPUT_OPTIONS = frozenset(
    {
        "-E",
        "-M",
        "-MM",
        "-fsyntax-only",
        "-dumpversion",
        "-dumpmachine",
        "-dumpspecs",
        "--version",
        "--help",
    }
)
# Options that only matter to the linker: dropped from the compile half of a split command so
# that gcc -c does not warn "linker input file unused because linking not done".
LINK_ONLY_FLAGS = frozenset(
    {
        "-shared",
        "-static",
        "-static-pie",
        "-pie",
        "-no-pie",
        "-rdynamic",
        "-s",
        "-r",
        "-nostdlib",
        "-nostartfiles",
        "-nodefaultlibs",
        "-static-libgcc",
        "-shared-libgcc",
        "-static-libstdc++",
    }
)
LINK_ONLY_WITH_ARGUMENT = frozenset({"-o", "-L", "-l", "-T", "-u", "-z", "-e", "-Xlinker"})
LINK_ONLY_PREFIXES = ("-Wl,", "-L", "-l", "-fuse-ld=")


# ---------------------------------------------------------------------------------------------
# compiler command line


class Input:
    """One input file word of a gcc command line."""

    __slots__ = ("explicit_language", "index", "language", "path")

    def __init__(self, path: str, index: int, language: str | None, explicit: str | None) -> None:
        self.path = path  # as written on the command line
        self.index = index  # position in argv (after @file expansion)
        self.language = language  # "c" / "c++" / "asm" / None (linker input or header)
        self.explicit_language = explicit  # the -x value in force, if any


class CompilerCommand:
    """What a gcc-compatible command line asks for (only what the wrapper needs)."""

    def __init__(self, args: list[str], cxx_driver: bool) -> None:
        self.args = args
        self.inputs: list[Input] = []
        self.libraries: list[str] = []  # -l names
        self.library_dirs: list[str] = []  # -L dirs
        self.output: str | None = None
        self.mode = "link"  # "preprocess" | "asm" | "compile" | "link"
        self.shared = False
        self.relocatable = False
        self.has_debug_flag = False
        self.static = False
        stop_at: str | None = None
        x_lang: str | None = None
        i = 0
        while i < len(args):
            a = args[i]
            if a in OPTIONS_WITH_ARGUMENT and i + 1 < len(args):
                value = args[i + 1]
                self._option_value(a, value)
                if a == "-x":
                    x_lang = None if value == "none" else value
                i += 2
                continue
            if a == "-" or not a.startswith("-"):
                self.inputs.append(self._input(a, i, x_lang, cxx_driver))
            elif a in NO_OUTPUT_OPTIONS or a.startswith("-print-"):
                stop_at = "preprocess"
            elif a == "-S" and stop_at != "preprocess":
                stop_at = "asm"
            elif a == "-c" and stop_at not in ("preprocess", "asm"):
                stop_at = "compile"
            elif a == "-shared":
                self.shared = True
            elif a == "-r":
                self.relocatable = True
            elif a in ("-static", "-Wl,-Bstatic"):
                self.static = True
            elif a.startswith("-g") and not a.startswith("-gno-"):
                self.has_debug_flag = True
            elif a.startswith("-x") and len(a) > 2:
                x_lang = None if a[2:] == "none" else a[2:]
            elif a.startswith("-o") and len(a) > 2:
                self.output = a[2:]
            elif a.startswith("-l") and len(a) > 2:
                self.libraries.append(a[2:])
            elif a.startswith("-L") and len(a) > 2:
                self.library_dirs.append(a[2:])
            i += 1
        if stop_at is not None:
            self.mode = stop_at

    def _option_value(self, option: str, value: str) -> None:
        if option == "-o":
            self.output = value
        elif option == "-l":
            self.libraries.append(value)
        elif option == "-L":
            self.library_dirs.append(value)

    @staticmethod
    def _input(path: str, index: int, x_lang: str | None, cxx_driver: bool) -> Input:
        if x_lang is not None:
            return Input(path, index, X_LANGUAGES.get(x_lang), x_lang)
        dot = path.rfind(".")
        suffix = path[dot:] if dot > path.rfind("/") else ""
        lang = C_SUFFIXES.get(suffix) or CXX_SUFFIXES.get(suffix) or ASM_SUFFIXES.get(suffix)
        if lang == "c" and cxx_driver:
            lang = "c++"  # g++ compiles .c files as C++ (gcc manual, "Compiling C++ Programs")
        return Input(path, index, lang, None)

    @property
    def sources(self) -> list[Input]:
        """The inputs the compiler compiles (not objects or libraries passed through to the
        linker)."""
        return [s for s in self.inputs if s.language is not None and s.path != "-"]

    @property
    def has_c_family_source(self) -> bool:
        """Whether this is a C or C++ compile: only those get livesplice's debug and section
        flags."""
        return any(s.language in ("c", "c++") for s in self.inputs)

    def linker_inputs(self) -> list[Input]:
        """The inputs handed to the linker (objects, archives, libraries; headers are neither)."""
        return [s for s in self.inputs if s.language is None and not is_header(s.path)]


def is_header(path: str) -> bool:
    """A header by its suffix: gcc accepts headers on its command line (to precompile
    them), and they are never linker inputs."""
    dot = path.rfind(".")
    return dot > path.rfind("/") and path[dot:] in HEADER_SUFFIXES


def with_extra_flags(args: list[str], cmd: CompilerCommand) -> list[str]:
    """The build's arguments plus ours, for a C/C++ compile.

    ``-g`` goes FIRST so a build's own ``-g3``/``-g0`` still wins; the section flags go LAST so
    they win over a ``-fno-function-sections`` in CFLAGS (for gcc the last of a pair wins).
    """
    if not cmd.has_c_family_source:
        return list(args)
    head = [] if cmd.has_debug_flag else ["-g"]
    tail = list(EXTRA_COMPILE_FLAGS)
    prefix_map = os.environ.get(PREFIX_MAP_ENV)
    if prefix_map:
        tail.append(f"-ffile-prefix-map={prefix_map}")
    return head + list(args) + tail


def stem_of(path: str) -> str:
    """The file name without directory and last suffix, as gcc names a default output."""
    base = path.rsplit("/", 1)[-1]
    dot = base.rfind(".")
    return base[:dot] if dot > 0 else base


def absolute(cwd: str, path: str) -> str:
    """``path`` as an absolute, normalised path (records must not depend on the build's cwd)."""
    return os.path.normpath(os.path.join(cwd, path))


def expand_response_files(args: list[str], cwd: str, depth: int = 0) -> list[str]:
    """Expand gcc/ar ``@file`` arguments (only for reading the command; exec uses the original)."""
    if depth > 8 or not any(a.startswith("@") for a in args):
        return args
    import shlex  # lazy: response files are rare and shlex pulls in re

    out: list[str] = []
    for a in args:
        if a.startswith("@") and len(a) > 1:
            try:
                with open(absolute(cwd, a[1:]), encoding="utf-8", errors="surrogateescape") as f:
                    out.extend(expand_response_files(shlex.split(f.read()), cwd, depth + 1))
                continue
            except OSError:
                pass  # gcc treats an unreadable @file as a plain argument; so do we
        out.append(a)
    return out


def resolve_library(name: str, dirs: list[str], cwd: str, static: bool) -> str | None:
    """The file ``-lNAME`` names, searched only in the build's own -L dirs (the tree's libraries).

    Like ld: for each directory in order, ``libNAME.so`` then ``libNAME.a`` (only ``.a`` after
    -static); ``-l:file`` names the file exactly.
    """
    names = (
        [name[1:]]
        if name.startswith(":")
        else ([f"lib{name}.a"] if static else [f"lib{name}.so", f"lib{name}.a"])
    )
    for d in dirs:
        for n in names:
            candidate = absolute(cwd, os.path.join(d, n))
            if os.path.exists(candidate):
                return candidate
    return None


def default_output(source: str, suffix: str, cwd: str) -> str:
    """Where gcc writes the output when no ``-o`` is given: the source's stem plus ``suffix``, in
    the current directory."""
    return absolute(cwd, stem_of(source) + suffix)


def split_objects(cmd: CompilerCommand, cwd: str) -> list[str]:
    """Object names for the compile half of a split compile+link command (deterministic)."""
    out = absolute(cwd, cmd.output or "a.out")
    outdir, outname = os.path.split(out)
    return [
        os.path.join(outdir, f"{stem_of(s.path)}-ls{n}-{outname}.o")
        for n, s in enumerate(cmd.sources)
    ]


def compile_only_args(args: list[str], cmd: CompilerCommand, source: Input) -> list[str]:
    """The compile half for one source: every option except inputs and link-only options."""
    inputs = {i.index for i in cmd.inputs}
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in OPTIONS_WITH_ARGUMENT and i + 1 < len(args):
            if a not in LINK_ONLY_WITH_ARGUMENT and a != "-x":
                out += [a, args[i + 1]]
            i += 2
            continue
        skip = (
            i in inputs
            or a in LINK_ONLY_FLAGS
            or a.startswith(LINK_ONLY_PREFIXES)
            or (a.startswith("-o") and len(a) > 2)
            or (a.startswith("-x") and len(a) > 2)
        )
        if not skip:
            out.append(a)
        i += 1
    if source.explicit_language is not None:
        out += ["-x", source.explicit_language]
    return out


# ---------------------------------------------------------------------------------------------
# ar command line


def parse_ar(args: list[str]) -> tuple[str, str, list[str]] | None:
    """``ar [--options] [-]KEY[MODS] [relpos] [count] ARCHIVE [MEMBERS]`` -> (op, archive, members).

    Operations (binutils ar manual): d delete, m move, p print, q quick append, r replace,
    s index only, t list, x extract. Modifiers a/b/i take a relpos word, N takes a count word.
    """
    words = [a for a in args if not a.startswith("--")]
    # --plugin NAME / --target BFD take the next word
    for opt in ("--plugin", "--target", "--output"):
        if opt in args:
            idx = args.index(opt)
            if idx + 1 < len(args) and args[idx + 1] in words:
                words.remove(args[idx + 1])
    if not words:
        return None
    key = words[0].lstrip("-")
    op = next((c for c in key if c in "dmpqrstx"), "")
    if not op:
        return None
    rest = words[1:]
    skip = (1 if any(c in key for c in "abi") else 0) + (1 if "N" in key else 0)
    rest = rest[skip:]
    if not rest:
        return None
    return op, rest[0], rest[1:]


# ---------------------------------------------------------------------------------------------
# running


def find_real_tool(tool: str, shim_dir: str, fallback: str) -> str:
    """The real ``tool``: an env override, else PATH after the shim directory, else ``fallback``.

    PATH is searched at every call (not frozen when the shims were made) so a build that puts
    its own toolchain directory in PATH still gets that toolchain.
    """
    override = os.environ.get(REAL_ENV_PREFIX + env_name(tool))
    if override:
        return override
    shim_real = os.path.realpath(shim_dir)
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or os.path.realpath(d) == shim_real:
            continue
        candidate = os.path.join(d, tool)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return fallback


def env_name(tool: str) -> str:
    """The environment-variable spelling of a tool name (``g++`` -> ``GXX``): how the shims find
    the real tool they stand for."""
    return "".join(c.upper() if c.isalnum() else "_" for c in tool.replace("+", "X"))


def environment_without_shims(shim_dir: str) -> dict[str, str]:
    """The environment with the shim directory taken out of PATH, so the real compiler (and
    anything it runs) never finds a shim again."""
    env = dict(os.environ)
    shim_real = os.path.realpath(shim_dir)
    env["PATH"] = os.pathsep.join(
        d for d in env.get("PATH", "").split(os.pathsep) if d and os.path.realpath(d) != shim_real
    )
    return env


# ``import json`` costs about 5 ms (it pulls in re and enum), a third of the wrapper's start-up;
# the events are only strings, booleans and lists of strings, so they are encoded by hand.
JSON_ESCAPES: dict[int, str] = {c: f"\\u{c:04x}" for c in range(0x20)}
JSON_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\"})


def to_json(value: object) -> str:
    """Compact JSON for str/bool/None/int/list/dict values (json.loads reads it back)."""
    if isinstance(value, str):
        return '"' + value.translate(JSON_ESCAPES) + '"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{to_json(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot encode {type(value).__name__}")


def append_events(events: list[dict[str, object]]) -> None:
    """Append JSON lines to the build log: O_APPEND + flock, so parallel make -j is safe."""
    log = os.environ.get(LOG_ENV)
    if not log or not events:
        return
    data = "".join(to_json(e) + "\n" for e in events).encode("utf-8", "surrogateescape")
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)  # closing releases the flock


def run_and_wait(argv: list[str], env: dict[str, str]) -> int:
    """Run the real tool and return its exit code (posix_spawn: no fork of a Python process per
    compile)."""
    pid = os.posix_spawn(argv[0], argv, env)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def compiler_main(tool: str, real: str, argv0: str, args: list[str], shim_dir: str) -> int:
    """The shim for gcc/cc/g++/c++: run the real compiler with livesplice's flags added, then
    record each object it wrote (and each link) in the build log."""
    cwd = os.getcwd()
    cxx_driver = "++" in tool
    cmd = CompilerCommand(expand_response_files(args, cwd), cxx_driver)
    env = environment_without_shims(shim_dir)
    original = [argv0, *args]

    def base_event(kind: str) -> dict[str, object]:
        return {"kind": kind, "argv": original, "cwd": cwd, "real": real, "tool": tool}

    if cmd.mode == "preprocess" or not cmd.inputs:
        os.execve(real, [real, *args], env)

    if cmd.mode in ("compile", "asm"):
        suffix = ".o" if cmd.mode == "compile" else ".s"
        events = []
        for s in cmd.sources:
            if cmd.output is not None and len(cmd.sources) == 1:
                out = absolute(cwd, cmd.output)
            else:
                out = default_output(s.path, suffix, cwd)
            ev = base_event("compile" if cmd.mode == "compile" else "to_asm")
            key = "object" if cmd.mode == "compile" else "output"
            ev.update(
                {"source": absolute(cwd, s.path), key: out, "language": s.language, "split": False}
            )
            events.append(ev)
        append_events(events)
        os.execve(real, [real, *with_extra_flags(args, cmd)], env)

    # link (possibly compiling sources on the way)
    objects = split_objects(cmd, cwd)
    events = []
    for source, obj in zip(cmd.sources, objects, strict=True):
        compile_args = compile_only_args(args, cmd, source)
        compile_cmd = CompilerCommand([*compile_args, source.path], cxx_driver)
        rc = run_and_wait(
            [real, *with_extra_flags(compile_args, compile_cmd), "-c", source.path, "-o", obj], env
        )
        if rc != 0:
            return rc
        ev = base_event("compile")
        ev.update(
            {
                "source": absolute(cwd, source.path),
                "object": obj,
                "language": source.language,
                "split": True,
            }
        )
        events.append(ev)
    replaced = dict(zip((s.index for s in cmd.sources), objects, strict=True))
    link_args = [replaced.get(i, a) for i, a in enumerate(cmd.args)]
    inputs = [absolute(cwd, i.path) for i in cmd.linker_inputs()] + objects
    for name in cmd.libraries:
        lib = resolve_library(name, cmd.library_dirs, cwd, cmd.static)
        if lib is not None:
            inputs.append(lib)
    ev = base_event("link")
    ev.update(
        {
            "output": absolute(cwd, cmd.output or "a.out"),
            "inputs": inputs,
            "shared": cmd.shared,
            "relocatable": cmd.relocatable,
        }
    )
    events.append(ev)
    append_events(events)
    if cmd.sources:
        # argv changed (sources -> objects): @file arguments were expanded in cmd.args
        os.execve(real, [real, *link_args], env)
    os.execve(real, [real, *args], env)


def ar_main(tool: str, real: str, argv0: str, args: list[str], shim_dir: str) -> int:
    """The shim for ``ar``: run the real archiver and record which members went into which
    archive, so units inside a static library are found later."""
    cwd = os.getcwd()
    parsed = parse_ar(expand_response_files(args, cwd))
    if parsed is not None and parsed[0] in "dqr":
        op, archive, members = parsed
        append_events(
            [
                {
                    "kind": "archive",
                    "archive": absolute(cwd, archive),
                    "operation": op,
                    "members": [absolute(cwd, m) for m in members],
                    "argv": [argv0, *args],
                    "cwd": cwd,
                    "tool": tool,
                }
            ]
        )
    os.execve(real, [real, *args], environment_without_shims(shim_dir))


def is_archiver(tool: str) -> bool:
    """Whether ``tool`` is an archiver (``ar``, ``x86_64-linux-gnu-ar``, ``gcc-ar-12``): those
    get the archive shim, not the compiler one."""
    base = tool.rsplit("-", 1)[0] if tool.rsplit("-", 1)[-1].isdigit() else tool
    return base == "ar" or base.endswith(("-ar", "gcc-ar"))


def main(argv: list[str]) -> int:
    """``wrapper.py TOOL FALLBACK SHIM_DIR ARGV0 ARGS...`` (the shim's command line)."""
    if len(argv) < 4:
        sys.stderr.write("livesplice wrapper: usage: wrapper.py TOOL FALLBACK SHIM_DIR ARGV0 ...\n")
        return 2
    tool, fallback, shim_dir, argv0 = argv[:4]
    args = argv[4:]
    real = find_real_tool(tool, shim_dir, fallback)
    if is_archiver(tool):
        return ar_main(tool, real, argv0, args, shim_dir)
    return compiler_main(tool, real, argv0, args, shim_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
