"""Update files from people who mean harm: refused before they cost memory or time.

The signature is checked on the compressed bytes before anything is decompressed; what is
decompressed (also under --allow-unsigned) is capped; the manifest is decoded strictly. The
fuzzers below feed mutated and random inputs to the update reader and to the state-record
decoder: the only acceptable outcome besides success is the documented error.

``LIVESPLICE_FUZZ_EXAMPLES=N`` runs N examples per fuzzer (default: a bounded CI run);
the seed corpus lives in tests/fuzz/corpus/.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livesplice.errors import LivespliceError
from livesplice.process.state import HEADER, MAGIC, VERSION, BadStateRecord, StateRecord
from livesplice.update.archive import MAGIC as UPDATE_MAGIC
from livesplice.update.archive import SIZES, decode_update

CORPUS = Path(__file__).parent / "fuzz" / "corpus"
EXAMPLES = int(os.environ.get("LIVESPLICE_FUZZ_EXAMPLES", "400"))
# the default run is the same every time (CI stays deterministic); a long run explores
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="LIVESPLICE_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=list(HealthCheck),
)


def envelope(payload: bytes, sig: bytes = b"") -> bytes:
    return UPDATE_MAGIC + SIZES.pack(len(sig), 0, len(payload)) + sig + payload


def gzip_bomb(size: int) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    out = [co.compress(block) for _ in range(size >> 20)]
    return b"".join(out) + co.flush()


def pax_tib() -> bytes:
    """A tar whose first header is a pax extended header declaring 1 TiB of data."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 1 << 40
    block = info.tobuf(format=tarfile.GNU_FORMAT)[:512]
    return gzip.compress(block + b"\0" * 1024)


def measure(update: Path, *args: str) -> dict[str, float | str]:
    """Refuse ``update`` in a fresh interpreter; its peak RSS growth and time."""
    code = (
        "import resource, sys, time, json\n"
        "from pathlib import Path\n"
        "from livesplice.update.archive import load_update\n"
        "from livesplice.errors import LivespliceError\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t0 = time.perf_counter()\n"
        "try:\n"
        "    load_update(Path(sys.argv[1]), allow_unsigned=sys.argv[2] == '1')\n"
        "    abort = 'accepted'\n"
        "except LivespliceError as e:\n"
        "    abort = e.abort\n"
        "ms = (time.perf_counter() - t0) * 1000\n"
        "grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base\n"
        "print(json.dumps({'abort': abort, 'ms': ms, 'rss_kib': grew}))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(update), *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    out: dict[str, float | str] = json.loads(r.stdout)
    return out


@pytest.mark.parametrize("allow_unsigned", ["0", "1"])
def test_decompression_bomb_and_huge_pax_header_cost_little(
    tmp_path: Path, allow_unsigned: str
) -> None:
    bomb = tmp_path / "bomb.update"
    bomb.write_bytes(envelope(gzip_bomb(1 << 30)))  # 1 GiB of zeros, ~1 MB on disk
    pax = tmp_path / "pax.update"
    pax.write_bytes(envelope(pax_tib()))
    for path in (bomb, pax):
        got = measure(path, allow_unsigned)
        expect = "MALFORMED_UPDATE" if allow_unsigned == "1" else "BAD_SIGNATURE"
        assert got["abort"] == expect, got
        # unsigned and refused: one SHA-256; allowed: at most 64x the input inflated
        assert float(got["rss_kib"]) < 96 * 1024, got
        assert float(got["ms"]) < 3000, got
        print(path.name, allow_unsigned, got)


def seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CORPUS.glob("*.update"))]


def test_the_corpus_is_there() -> None:
    names = {p.name for p in CORPUS.glob("*.update")}
    assert {"valid.update", "signed.update"} <= names, names
    decode_update(CORPUS.joinpath("valid.update").read_bytes())


@st.composite
def mutated_updates(draw: st.DrawFn) -> bytes:
    blob = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "payload"]))
        if op == "flip" and blob:
            i = draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut" and blob:
            del blob[draw(st.integers(0, len(blob) - 1)) :]
        elif op == "insert":
            i = draw(st.integers(0, len(blob)))
            blob[i:i] = draw(st.binary(max_size=16))
        else:  # a fresh payload around mutated members: gets past the gzip/tar layers
            blob = bytearray(envelope(gzip.compress(draw(tar_payloads()))))
    return bytes(blob)


@st.composite
def tar_payloads(draw: st.DrawFn) -> bytes:
    base = json.loads(_valid_manifest())
    node = base
    path = draw(
        st.lists(st.sampled_from(["targets", 0, "sections", "relocs", "symbols"]), max_size=3)
    )
    for key in path:
        try:
            node = node[key] if not isinstance(node, list) else node[0]
        except (KeyError, IndexError, TypeError):
            break
    if isinstance(node, dict) and node:
        k = draw(st.sampled_from(sorted(node)))
        node[k] = draw(
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                lambda c: (
                    st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3)
                ),
                max_leaves=6,
            )
        )
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = json.dumps(base).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def _valid_manifest() -> bytes:
    from livesplice.update.archive import open_envelope

    env = open_envelope(CORPUS.joinpath("valid.update").read_bytes())
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(env.payload)), mode="r:") as tar:
        f = tar.extractfile("manifest.json")
        assert f is not None
        return f.read()


@FUZZ
@given(mutated_updates())
def test_fuzz_update_reader(blob: bytes) -> None:
    try:
        decode_update(blob)
    except LivespliceError as e:
        assert e.code == 2, e.render()


@FUZZ
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda c: (
            st.lists(c, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "id",
                        "description",
                        "sequence",
                        "applied_at",
                        "trampolines",
                        "code",
                        "data",
                        "hooks",
                        "targets",
                        "pause_us",
                        "tool_pid",
                        "reverted",
                        "functions",
                        "address",
                        "jump",
                        "original",
                        "replacement",
                        "busy_start",
                        "busy_end",
                        "function",
                        "target",
                        "pre_reverse",
                    ]
                ),
                c,
                max_size=14,
            )
        ),
        max_leaves=30,
    )
)
def test_fuzz_state_record_decoder(raw: object) -> None:
    body = json.dumps(raw).encode()
    for blob in (
        HEADER.pack(MAGIC, VERSION, len(body)) + body,
        HEADER.pack(MAGIC, VERSION, len(body) + 7) + body,
        body,
    ):
        with contextlib.suppress(BadStateRecord):
            StateRecord.decode(blob)


@pytest.mark.parametrize(
    "kernel_json",
    [
        b"[" * 100000,
        b"[]",
        b'"x"',
        b"{}",
        b'{"module": "../../x"}',
        b'{"module": "livesplice_ok", "funcs": [{"object": 1, "name": "f"}]}',
        b'{"module": "livesplice_ok", "klp_symbols": [{"object": "vmlinux", "name": "f", '
        b'"count": "2"}]}',
        # matching looks the key up and adds learn's offset to an address
        b'{"module": "livesplice_ok", "klp_symbols": [{"object": "vmlinux", "name": "f", '
        b'"count": 2}]}',
        b'{"module": "livesplice_ok", "klp_symbols": [{"object": "vmlinux", "name": "f", '
        b'"count": 2, "key": "f", "learn": ["s", "8"]}]}',
        b'{"module": "livesplice_ok", "klp_symbols": [{"object": "vmlinux", "name": "f", '
        b'"count": 2, "key": "f", "learn": [".text.g"]}]}',
    ],
)
def test_kernel_members_are_checked_before_use(kernel_json: bytes) -> None:
    """kernel.json names the module file apply writes and the symbols it looks up."""
    from livesplice.errors import MalformedUpdate
    from livesplice.kernel.package import KERNEL_MEMBER, MODULE_MEMBER, read_kernel_members
    from livesplice.update.archive import decode_update

    good = decode_update(CORPUS.joinpath("valid.update").read_bytes())
    good.extra = {MODULE_MEMBER: b"\x7fELF", KERNEL_MEMBER: kernel_json}
    with pytest.raises(MalformedUpdate):
        read_kernel_members(good)
