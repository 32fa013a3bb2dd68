"""``livesplice inspect``: what an update contains, for people and for scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from livesplice.text import printable
from livesplice.update.archive import UpdateFile


def signature_verdict(update: UpdateFile, trusted: list[Path] | None = None) -> dict[str, Any]:
    """The verdict ``apply`` would reach on this machine, without --allow-unsigned:
    ``valid`` (by a trusted key), ``untrusted`` (signed by a key not trusted here: not
    checked), ``INVALID`` (bad or malformed signature) or ``unsigned``."""
    from livesplice.update.signing import SignatureError

    if update.signature is None:
        return {"verdict": "unsigned", "key": None, "reason": "the update is not signed"}
    try:
        kid = update.verify(trusted)
    except SignatureError as e:
        key = _signer(update)
        kind = "untrusted" if "not trusted" in e.reason else "INVALID"
        return {"verdict": kind, "key": key, "reason": e.reason}
    return {"verdict": "valid", "key": kid, "reason": ""}


def inspect_json(update: UpdateFile, trusted: list[Path] | None = None) -> dict[str, Any]:
    """What ``inspect --json`` prints: the manifest's facts and the signature verdict."""
    m = update.manifest
    return {
        "id": m.id,
        "description": m.description,
        "compiler": m.compiler,
        "source": m.source,
        "format": m.format,
        "patch_sha256": m.patch_sha256,
        "signed": update.signature is not None,
        "signer": _signer(update),
        "signature": signature_verdict(update, trusted),
        "targets": [
            {
                "name": t.name,
                "kind": t.kind,
                "build_id": t.build_id,
                "units": t.units,
                "changed_functions": t.changed_functions,
                "new_functions": t.new_functions,
                "new_data": t.new_data,
                "pre_functions": sorted(s.name for s in t.sections if s.role == "pre"),
                "verified": [
                    {
                        "file": v.file,
                        "build_id": v.build_id,
                        "origin": v.origin,
                        "functions": v.functions,
                    }
                    for v in t.verified
                ],
            }
            for t in m.targets
        ],
        "hooks": [{"kind": h.kind, "function": h.function, "target": h.target} for h in m.hooks],
        "warnings": m.warnings,
    }


def _signer(update: UpdateFile) -> str | None:
    import json

    if update.signature is None:
        return None
    try:
        return str(json.loads(update.signature)["key_id"])
    except (ValueError, KeyError, TypeError):
        return "malformed"


_VERDICT_WORDS = {
    "valid": "valid, by key {key}",
    "untrusted": "by key {key}, which is NOT trusted here (apply would refuse)",
    "INVALID": "INVALID ({reason})",
    "unsigned": "unsigned (apply refuses it without --allow-unsigned)",
}


def inspect_text(update: UpdateFile, trusted: list[Path] | None = None) -> str:
    """Every line made printable: the update may come from anyone."""
    info = inspect_json(update, trusted)
    sig = info["signature"]
    lines = [
        f"update {info['id']}: {printable(info['description'])}",
        f"  compiler:  {printable(info['compiler'])}",
        *([f"  source:    {printable(info['source'])}"] if info["source"] else []),
        f"  signature: {printable(_VERDICT_WORDS[sig['verdict']].format(**sig))}",
    ]
    for t in info["targets"]:
        lines.append(
            f"  target {printable(t['name'])} ({t['kind']}, build-id {t['build_id'] or 'none'})"
        )
        for label, key in (
            ("changed function", "changed_functions"),
            ("new function", "new_functions"),
            ("new data", "new_data"),
        ):
            for name in t[key]:
                lines.append(f"    {label}: {printable(name)}")
        for v in t["verified"]:
            lines.append(
                f"    verified against {printable(v['origin'])}: "
                f"{printable(v['file'])} (build-id {v['build_id']})"
            )
    for h in info["hooks"]:
        lines.append(f"  hook {h['kind']}: {printable(h['function'])} ({printable(h['target'])})")
    for w in info["warnings"]:
        lines.append(f"  warning: {printable(w)}")
    return "\n".join(lines)
