"""spot-supervisor's daemon: restore, supervise the trainer, race checkpoints into storage.

Importing this package is cheap and pulls in neither boto3 nor torch: the training
library imports :mod:`daemon.layout` (the on-disk checkpoint contract) from here.

Where things live (docs/architecture.md has the picture):

* the loop: :mod:`~daemon.supervisor` (wait, ask, act), :mod:`~daemon.policy` (what each
  event means: pure), :mod:`~daemon.loop` (wake-ups, watchdog, work off the loop),
  :mod:`~daemon.state` (phases and state.json), :mod:`~daemon.deadline` (the drain clock),
  :mod:`~daemon.maintenance`, :mod:`~daemon.standby`;
* what the loop acts through: :mod:`~daemon.boot` (from the ledger's first line to the
  started sync; the stores: :mod:`~daemon.stores`), :mod:`~daemon.drain` (notice file,
  SIGTERM, emergency commit), :mod:`~daemon.exits` (the trainer's exit or hang, the
  restarts), :mod:`~daemon.progress` (the newest local checkpoint), :mod:`~daemon.ending`
  (the run's last steps), :mod:`~daemon.budget` (the 30-second clouds' notice budget);
* the trainer: :mod:`~daemon.launch` (its start), :mod:`~daemon.child` (the process
  tree), :mod:`~daemon.runas` (its user);
* several nodes: :mod:`~daemon.nodes` (alignment with the global commit),
  :mod:`~daemon.rendezvous` (torchrun ids);
* :mod:`daemon.notices` (where notices come from), :mod:`daemon.storage` (the bucket),
  :mod:`daemon.fleet` (launching instances; never on the ``run`` path),
  :mod:`daemon.report` and :mod:`~daemon.ledger` (what a run cost; ``ledger_format``,
  ``ledger_writer``, ``ledger_reader``, ``ledger_instance``);
* the checkpoint on disk, shared with the trainer: :mod:`~daemon.layout` (the contract's
  import path; ``layout_manifest``, ``layout_writer``, ``layout_verify``);
* operators: :mod:`~daemon.cli`, :mod:`~daemon.config` (``config_values``,
  ``config_schema``), :mod:`~daemon.preflight`,
  :mod:`~daemon.status`, :mod:`~daemon.metrics`, :mod:`~daemon.log`,
  :mod:`~daemon.journal`, :mod:`~daemon.sdnotify`.

What must not live here: torch (the daemon must install and run without it), and the
test and demo tooling of :mod:`daemon.standins`, which nothing else imports.
"""

__version__ = "0.1.0"
