"""Every changed output reported, and dynamic modules as targets (issue 13 item 4).

nginx built ``--with-mail=dynamic`` compiles src/mail/ into ``ngx_mail_module.so``, a shared
object without a soname that nginx loads with dlopen. A mail fix does not change the
``nginx`` executable: ``create --target nginx`` used to answer "nothing to do", which a
security team reads as "not affected". Here a host program dlopen()s a module from
/usr/lib/nginx/modules/-like path, and the fix changes only the module:

* ``create --target host`` must name the module and its changed function, exit
  TARGET_UNCHANGED (13) and write nothing -- never "nothing to do";
* ``create`` makes an update for the module, and ``apply --pid`` splices it into the running
  host (found by the module's file name, matched by its code: the running module is the
  project's own build, not livesplice's), verified by the host's output changing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from livetest import Running, build, livesplice, make_patch, write_tree

MODULE = "ngx_mail_module.so"
FILES = {
    # The host exports host_scale (-rdynamic) for its modules, as nginx exports its core.
    "host.c": (
        "#include <dlfcn.h>\n#include <stdio.h>\n#include <unistd.h>\n"
        "int host_scale(int x)\n{\n\treturn x * 10;\n}\n"
        "int main(int argc, char **argv)\n{\n"
        "\tvoid *m = dlopen(argv[1], RTLD_NOW);\n"
        '\tif (!m) {\n\t\tprintf("dlopen: %s\\n", dlerror());\n\t\treturn 1;\n\t}\n'
        '\tint (*reply)(int) = (int (*)(int))dlsym(m, "mail_reply");\n'
        '\tprintf("ready\\n");\n\tfflush(stdout);\n'
        '\tfor (;;) {\n\t\tprintf("reply=%d\\n", reply(7));\n'
        "\t\tfflush(stdout);\n\t\tusleep(20000);\n\t}\n}\n"
    ),
    "mail.c": (
        "int host_scale(int x);\n"
        "static int replies;\n"
        "int mail_reply(int n)\n{\n\treplies++;\n\treturn host_scale(n) + 1;\n}\n"
    ),
    "Makefile": (
        "CFLAGS ?= -O2 -g\n"
        f"all: host {MODULE}\n"
        "host: host.o\n\t$(CC) -rdynamic -o $@ host.o -ldl\n"
        f"{MODULE}: mail.o\n\t$(CC) -shared -o $@ mail.o\n"
        "mail.o: mail.c\n\t$(CC) $(CFLAGS) -fPIC -c -o $@ $<\n"
        "host.o: host.c\n\t$(CC) $(CFLAGS) -c -o $@ $<\n"
    ),
}
EDITS = {"mail.c": [("return host_scale(n) + 1;", "return host_scale(n) + 2;")]}


def _project(tmp_path: Path) -> tuple[Path, Path]:
    tree = write_tree(tmp_path / "src", FILES)
    return tree, make_patch(tree, EDITS, tmp_path / "fix.patch")


def test_target_unchanged_names_the_changed_module(tmp_path: Path) -> None:
    tree, patch = _project(tmp_path)
    out = tmp_path / "out" / "u.update"
    out.parent.mkdir()
    r = livesplice(
        "create",
        "--patch",
        str(patch),
        "-o",
        str(out),
        "--target",
        "host",
        "--json",
        str(tree),
        check=False,
    )
    assert r.returncode == 13, r.stdout + r.stderr
    assert "nothing to do" not in r.stdout + r.stderr
    assert "TARGET_UNCHANGED" in r.stderr and MODULE in r.stderr, r.stderr
    assert "mail_reply" in r.stderr and f"--target {MODULE}" in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"] == "target_unchanged"
    assert [
        (o["name"], o["kind"], o["soname"], o["changed_functions"]) for o in doc["other_outputs"]
    ] == [(MODULE, "shared_library", None, ["mail_reply"])]
    assert list(out.parent.iterdir()) == [], "no update may be written"


def test_module_update_applies_to_the_process_that_dlopened_it(tmp_path: Path) -> None:
    tree, patch = _project(tmp_path)
    update = tmp_path / "mail.update"
    r = livesplice("create", "--patch", str(patch), "-o", str(update), "--json", str(tree))
    doc = json.loads(r.stdout)
    assert doc["status"] == "created" and doc["other_outputs"] == [], r.stdout
    assert [(t["name"], t["kind"], t["changed_functions"]) for t in doc["targets"]] == [
        (MODULE, "shared_library", ["mail_reply"])
    ]

    # the deployed build: the project's own make, installed where nginx keeps its modules
    deployed = tmp_path / "deployed"
    shutil.copytree(tree, deployed)
    build(deployed)
    modules = tmp_path / "usr/lib/nginx/modules"
    modules.mkdir(parents=True)
    shutil.copy(deployed / MODULE, modules / MODULE)
    host = Running([str(deployed / "host"), str(modules / MODULE)])
    try:
        host.wait_for("reply=71")
        r = livesplice("apply", str(update), "--pid", str(host.pid))
        assert str(modules / MODULE) in r.stdout, r.stdout
        host.wait_for("reply=72", timeout=5)
    finally:
        host.stop()
