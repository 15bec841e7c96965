"""``python -m daemon.standins.emulator``: see :mod:`.cli`."""

import sys

from daemon.standins.emulator.cli import main

sys.exit(main())
