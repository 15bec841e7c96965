"""``python -m daemon`` is ``spot-supervisor``."""

from daemon.cli import main

raise SystemExit(main())
