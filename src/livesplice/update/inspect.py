"""``livesplice inspect``: what an update contains, for people and for scripts."""

from __future__ import annotations

from typing import Any

from livesplice.update.archive import UpdateFile


def inspect_json(update: UpdateFile) -> dict[str, Any]:
    m = update.manifest
    return {
        "id": m.id,
        "description": m.description,
        "compiler": m.compiler,
        "format": m.format,
        "patch_sha256": m.patch_sha256,
        "signed": update.signature is not None,
        "signer": _signer(update),
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


def inspect_text(update: UpdateFile) -> str:
    info = inspect_json(update)
    lines = [
        f"update {info['id']}: {info['description']}",
        f"  compiler: {info['compiler']}",
        f"  signed:   {'by key ' + info['signer'] if info['signed'] else 'no'}",
    ]
    for t in info["targets"]:
        lines.append(f"  target {t['name']} ({t['kind']}, build-id {t['build_id'] or 'none'})")
        for label, key in (
            ("changed function", "changed_functions"),
            ("new function", "new_functions"),
            ("new data", "new_data"),
        ):
            for name in t[key]:
                lines.append(f"    {label}: {name}")
    for h in info["hooks"]:
        lines.append(f"  hook {h['kind']}: {h['function']} ({h['target']})")
    for w in info["warnings"]:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)
