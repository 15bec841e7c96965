"""``python -m daemon.standins.faultproxy``: see :mod:`.cli`."""

import sys

from daemon.standins.faultproxy.cli import main

sys.exit(main())
