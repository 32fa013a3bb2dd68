"""`livesplice create --debian SOURCE=VERSION`: a real package from Debian's archive.

tree 2.1.0-1 (bookworm): a small C program, built as Debian does (dpkg-buildpackage -B in a
clean environment), and the update verified against the archive's own stripped
/usr/bin/tree -- the binary users run. Needs Debian's archive (reachable from CI).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from livetest import livesplice

FIX = "\n".join(
    [  # context lines keep their leading space (blank ones too)
        "--- a/json.c",
        "+++ b/json.c",
        "@@ -165,7 +165,7 @@",
        " ",
        " int json_error(char *error)",
        " {",
        '-  fprintf(outfile,"{\\"error\\": \\"%s\\"}%s",error, noindent?"":"\\n");',
        '+  fprintf(outfile,"{\\"error\\": \\"%s\\", \\"live\\": true}%s",error, noindent?"":"\\n");',  # noqa: E501
        "   return 0;",
        " }",
        " ",
        "",
    ]
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="apt needs root")


def test_create_for_a_debian_version_is_verified_against_the_archive_binary(tmp_path: Path) -> None:
    patch = tmp_path / "fix.patch"
    patch.write_text(FIX)
    out = tmp_path / "tree.update"
    r = livesplice(
        "create",
        "--debian",
        "tree=2.1.0-1",
        "--patch",
        str(patch),
        "-o",
        str(out),
        "--id",
        "tree1",
        "--json",
        timeout=900,
    )
    (v,) = json.loads(r.stdout)["verified"]
    assert v["target"] == "tree" and v["file"] == "usr/bin/tree", v
    assert v["origin"] == "Debian tree 2.1.0-1 (amd64)" and v["functions"] >= 1
    info = json.loads(livesplice("inspect", str(out), "--json").stdout)
    assert info["source"] == "Debian tree 2.1.0-1"
    (t,) = info["targets"]
    assert t["changed_functions"] == ["json_error"]  # built with the same flags both times
    assert t["verified"][0]["build_id"] == v["build_id"] != t["build_id"]


def test_create_for_a_version_the_archive_does_not_have(tmp_path: Path) -> None:
    patch = tmp_path / "fix.patch"
    patch.write_text(FIX)
    r = livesplice(
        "create",
        "--debian",
        "tree=0.0.1-1",
        "--patch",
        str(patch),
        "-o",
        str(tmp_path / "u.update"),
        check=False,
        timeout=300,
    )
    assert r.returncode == 2 and "SOURCE_UNAVAILABLE" in r.stderr, r.stderr
    r = livesplice("create", "--debian", "tree", "--patch", str(patch), check=False)
    assert r.returncode == 2 and "SOURCE=VERSION" in r.stderr, r.stderr
    r = livesplice(
        "create", "--debian", "tree=2.1.0-1", "--patch", str(patch), str(tmp_path), check=False
    )
    assert r.returncode == 2 and "not both" in r.stderr, r.stderr


def test_a_source_fetched_by_url_must_be_signed(tmp_path: Path) -> None:
    """A version the archive index no longer lists comes from the pool by plain URL: its
    .dsc must carry a valid Debian uploader's signature before livesplice builds from it."""
    from livesplice.build.debian import debian_cache, fetch_source_version, unpack_source
    from livesplice.errors import SourceUnavailable

    dsc = fetch_source_version("tree", "2.1.0-1", debian_cache())  # through apt: trusted
    pool = tmp_path / "pool"
    pool.mkdir()
    for f in dsc.parent.glob("tree_2.1.0*"):
        shutil.copy(f, pool / f.name)
    (pool / "UNVERIFIED").write_text(f"{dsc.name} from http://deb.debian.org/...\n")
    unpack_source(pool / dsc.name, tmp_path / "good")  # signed by its uploader
    assert (tmp_path / "good" / "tree.c").exists()
    text = (pool / dsc.name).read_text()
    tampered = text.replace("Standards-Version:", "Homepage: x\nStandards-Version:")
    (pool / dsc.name).write_text(tampered)
    with pytest.raises(SourceUnavailable, match="signature could not be verified"):
        unpack_source(pool / dsc.name, tmp_path / "bad")
    assert not (tmp_path / "bad" / "tree.c").exists()
    # a validly signed .dsc of another version, served under the requested name
    other = pool / "tree_2.1.1-1.dsc"
    other.write_text(text)
    with pytest.raises(SourceUnavailable, match="not the version its name says"):
        unpack_source(other, tmp_path / "other")
