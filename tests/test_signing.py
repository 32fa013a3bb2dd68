"""Signed updates: apply refuses unsigned, unknown-key and tampered updates."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from livetest import Running, build, livesplice, livesplice_json, make_patch, write_tree
from test_apply import BASIC, BASIC_FIX, MAKEFILE


@pytest.fixture
def prepared(tmp_path: Path) -> tuple[Path, Path, Path]:
    tree = write_tree(tmp_path / "src", {"prog.c": BASIC, "Makefile": MAKEFILE})
    patch = make_patch(tree, BASIC_FIX, tmp_path / "fix.patch")
    running = write_tree(tmp_path / "run", {"prog.c": BASIC, "Makefile": MAKEFILE})
    build(running)
    return tree, patch, running


def rewrite_member(update: Path, out: Path, name: str, edit: object) -> None:
    """Copy an update, changing one member (the signature is kept as it was)."""
    from livesplice.update.archive import MAGIC, SIZES, open_envelope

    env = open_envelope(update.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(env.payload)), mode="r:") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    members[name] = edit(members[name])  # type: ignore[operator]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for n, data in members.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    payload = gzip.compress(raw.getvalue())
    sig = env.signature or b""
    out.write_bytes(MAGIC + SIZES.pack(len(sig), 0, len(payload)) + sig + payload)


def test_signed_update_applies_and_inspect_names_the_key(
    prepared: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    tree, patch, running = prepared
    update = tmp_path / "u.update"
    livesplice("create", "--patch", str(patch), "--id", "sign0001", "-o", str(update), str(tree))
    info = livesplice_json("inspect", str(update))
    assert info["signed"] and len(info["signer"]) == 16
    assert info["signature"] == {"verdict": "valid", "key": info["signer"], "reason": ""}
    assert f"signature: valid, by key {info['signer']}" in livesplice("inspect", str(update)).stdout
    prog = Running([str(running / "prog")])
    try:
        prog.wait_for("value 1")
        r = livesplice("apply", str(update), "--pid", str(prog.pid))
        assert f"signed by key {info['signer']}" in r.stdout
        prog.wait_for("value 2")
    finally:
        prog.stop()


def test_unsigned_unknown_and_tampered_updates_are_refused(
    prepared: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, patch, running = prepared
    signed = tmp_path / "signed.update"
    livesplice("create", "--patch", str(patch), "--id", "sign0002", "-o", str(signed), str(tree))
    monkeypatch.delenv("LIVESPLICE_SIGNING_KEY")
    unsigned = tmp_path / "unsigned.update"
    livesplice("create", "--patch", str(patch), "--id", "sign0003", "-o", str(unsigned), str(tree))
    tampered = tmp_path / "tampered.update"
    rewrite_member(signed, tampered, "patch", lambda b: b + b"\n# sneaky\n")
    forged = tmp_path / "forged.update"

    def flip_code(b: bytes) -> bytes:
        m = json.loads(b)
        sec = next(s for s in m["targets"][0]["sections"] if s["role"] == "replacement")
        sec["data"] = "cc" + sec["data"][2:]
        return json.dumps(m).encode()

    rewrite_member(signed, forged, "manifest.json", flip_code)
    prog = Running([str(running / "prog")])
    try:
        prog.wait_for("value 1")
        before = Path(f"/proc/{prog.pid}/maps").read_text()
        for update, words in [
            (unsigned, "not signed"),
            (tampered, "BAD signature"),
            (forged, "BAD signature"),
        ]:
            r = livesplice("apply", str(update), "--pid", str(prog.pid), check=False)
            assert r.returncode == 2, (update, r.stdout, r.stderr)
            assert "BAD_SIGNATURE" in r.stderr and words in r.stderr, r.stderr
        # The operator may take responsibility for an unsigned update; never for a bad one
        # (the signer's key is trusted here, so the signature is checked and fails).
        r = livesplice(
            "apply", str(tampered), "--pid", str(prog.pid), "--allow-unsigned", check=False
        )
        assert r.returncode == 2 and "BAD signature" in r.stderr, r.stderr
        # A key this machine does not trust.
        trusted = os.environ["LIVESPLICE_TRUST_DIR"]
        monkeypatch.setenv("LIVESPLICE_TRUST_DIR", str(tmp_path))
        r = livesplice("apply", str(signed), "--pid", str(prog.pid), check=False)
        assert r.returncode == 2 and "not trusted" in r.stderr, r.stderr
        r = livesplice(
            "apply",
            str(signed),
            "--pid",
            str(prog.pid),
            "--trusted-key",
            str(Path(trusted) / "test.pub"),
            "--json",
        )
        assert json.loads(r.stdout)["processes"][0]["status"] == "applied"
        livesplice("undo", "sign0002", "--pid", str(prog.pid))
        prog.wait_for("value 1")
        assert Path(f"/proc/{prog.pid}/maps").read_text() == before
        livesplice("apply", str(unsigned), "--pid", str(prog.pid), "--allow-unsigned")
        prog.wait_for("value 2")
    finally:
        prog.stop()


def test_update_is_read_once_a_fifo_cannot_swap_it(
    prepared: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The signature is checked on the bytes that are applied: a path that serves different
    content on each read (a FIFO) is refused, and nothing is applied."""
    import threading

    tree, patch, running = prepared
    good = tmp_path / "good.update"
    livesplice("create", "--patch", str(patch), "--id", "fifo0001", "-o", str(good), str(tree))
    fifo = tmp_path / "swap.update"
    os.mkfifo(fifo)

    def serve() -> None:
        for _ in range(2):
            try:
                with open(fifo, "wb") as f:
                    f.write(good.read_bytes())
            except OSError:
                return

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    prog = Running([str(running / "prog")])
    try:
        prog.wait_for("value 1")
        r = livesplice("apply", str(fifo), "--pid", str(prog.pid), check=False)
        assert r.returncode == 2 and "not a regular file" in r.stderr, r.stderr
        assert "livesplice" not in Path(f"/proc/{prog.pid}/maps").read_text()
    finally:
        prog.stop()
        # unblock the server thread if it still waits for a reader
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
