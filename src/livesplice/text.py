"""Text from other people, made safe to print.

Descriptions, ids, thread names and paths can come from update files and from the memory of
processes any local user owns. Printed raw, an escape sequence can erase lines and forge
output (``\\x1b[2K\\rpid 1: CVE-... [applied]``). Everything the CLI prints from such a source
goes through :func:`printable`.
"""

from __future__ import annotations

import re

# C0 and C1 control characters, DEL, and the Unicode bidi overrides/isolates
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: object, limit: int = 4096) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``), cut to
    ``limit`` characters."""
    s = str(text)
    if len(s) > limit:
        s = s[:limit] + "…"
    return _UNSAFE.sub(lambda m: ascii(m.group())[1:-1], s)
