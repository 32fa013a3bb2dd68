"""Session-wide test setup: a signing key for every update the tests create.

``livesplice apply`` refuses unsigned updates. The tests make one Ed25519 key pair per
session and point ``create`` (LIVESPLICE_SIGNING_KEY) and ``apply`` (LIVESPLICE_TRUST_DIR) at
it, exactly as an operator would with a real key and trust directory; tests of the signing
rules themselves override these.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def signing_key() -> Iterator[Path]:
    from livesplice.update.signing import generate_key

    with tempfile.TemporaryDirectory(prefix="livesplice-test-keys-") as d:
        pair = generate_key()
        key = Path(d) / "test.key"
        key.write_bytes(pair.private_pem)
        trust = Path(d) / "trusted"
        trust.mkdir()
        (trust / "test.pub").write_bytes(pair.public_pem)
        saved = {k: os.environ.get(k) for k in ("LIVESPLICE_SIGNING_KEY", "LIVESPLICE_TRUST_DIR")}
        os.environ["LIVESPLICE_SIGNING_KEY"] = str(key)
        os.environ["LIVESPLICE_TRUST_DIR"] = str(trust)
        try:
            yield key
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="session", autouse=True)
def prebuild_cache() -> Iterator[Path]:
    """Every ``create`` of the session shares one private prebuild cache: nothing is left in
    the user's ~/.cache, and no other run's entries can make a test pass."""
    with tempfile.TemporaryDirectory(prefix="livesplice-test-prebuild-") as d:
        saved = os.environ.get("LIVESPLICE_PREBUILD_CACHE")
        os.environ["LIVESPLICE_PREBUILD_CACHE"] = str(Path(d) / "prebuild")
        try:
            yield Path(d) / "prebuild"
        finally:
            if saved is None:
                os.environ.pop("LIVESPLICE_PREBUILD_CACHE", None)
            else:
                os.environ["LIVESPLICE_PREBUILD_CACHE"] = saved
