"""``python -m livesplice``: the same command as ``livesplice`` (cli.main)."""

from livesplice.cli import main

raise SystemExit(main())
