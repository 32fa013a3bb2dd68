from livesplice.cli import main

raise SystemExit(main())
