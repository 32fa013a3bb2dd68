"""livesplice: Ksplice-style rebootless and restartless updates.

A source patch becomes a live update (``create``) that is spliced into running processes or a
running Linux kernel (``apply``) without a restart. See README.md and docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
