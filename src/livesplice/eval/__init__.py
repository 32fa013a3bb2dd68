"""The evaluation: real Debian security fixes, built with ``livesplice create`` and spliced live.

``python -m livesplice.eval CSV`` takes rows of the corpus format (package, version,
first_patch, last_patch, cves, expected, target, change_class) and, for each row, fetches the
Debian source package, builds pre (the series up to the fix) and post (through it) with the
package's own build through ``livesplice create``, starts the pre build under load, applies
the update live, checks the process kept its PID and served every request, and undoes it.
See docs/EVAL.md.
"""
