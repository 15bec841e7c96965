"""Simulated instances of one run, for the tests of several nodes and of standbys.

The harness lives in :mod:`daemon.standins.instances` (``bench/bench_fleet.py`` boots the
same instances); this module keeps the names importable as ``from instances import``.
"""

from daemon.standins.instances import Instances, kill_instance, process_env

__all__ = ["Instances", "kill_instance", "process_env"]
