"""spot-supervisor's daemon: restore, supervise the trainer, race checkpoints into storage.

Importing this package is cheap and pulls in neither boto3 nor torch: the training
library imports :mod:`daemon.layout` (the on-disk checkpoint contract) from here.

Where things live (docs/architecture.md has the picture):

* the loop: :mod:`~daemon.supervisor` (wait, ask, act), :mod:`~daemon.policy` (what each
  event means: pure), :mod:`~daemon.loop` (wake-ups, watchdog, work off the loop),
  :mod:`~daemon.state` (phases and state.json), :mod:`~daemon.deadline` (the drain clock),
  :mod:`~daemon.maintenance`, :mod:`~daemon.standby`;
* the trainer: :mod:`~daemon.child` (the process tree), :mod:`~daemon.runas` (its user);
* several nodes: :mod:`~daemon.nodes` (alignment with the global commit),
  :mod:`~daemon.rendezvous` (torchrun ids);
* :mod:`daemon.notices` (where notices come from), :mod:`daemon.storage` (the bucket),
  :mod:`daemon.fleet` (launching instances; never on the ``run`` path),
  :mod:`daemon.report` and :mod:`~daemon.ledger` (what a run cost);
* operators: :mod:`~daemon.cli`, :mod:`~daemon.config`, :mod:`~daemon.preflight`,
  :mod:`~daemon.status`, :mod:`~daemon.metrics`, :mod:`~daemon.log`,
  :mod:`~daemon.journal`, :mod:`~daemon.sdnotify`.

What must not live here: torch (the daemon must install and run without it), and the
test and demo tooling of :mod:`daemon.standins`, which nothing else imports.
"""

__version__ = "0.1.0"
