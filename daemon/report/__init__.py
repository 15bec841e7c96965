"""``spot-supervisor report``: what spot cost a run, from its ledger (issue 17).

Every supervisor of a run writes what it did to the run's ledger
(:mod:`daemon.ledger`: ``<remote>/<run.id>/ledger/<boot-id>.jsonl``). The report reads
the ledger and the run's committed checkpoints and writes three files:

* ``report.json``: the figures under stable keys (``interruptions``, ``boots``,
  ``lost_steps``, ``goodput``, ``cost.spot_usd``, ``cost.on_demand_usd``, ...), each
  documented in :mod:`daemon.report.figures`;
* ``timeline.png``: one lane per instance over time, with notices, commits, restores,
  lost work and the committed step (:mod:`daemon.report.timeline`);
* ``report.html``: one self-contained page with the picture and the figures
  (:mod:`daemon.report.html`).

The pieces:

* :mod:`~daemon.report.figures`: pure: ledger and checkpoints in, the figures out
  (``compute``); from :mod:`~daemon.report.views` (the ledger boot by boot),
  :mod:`~daemon.report.costs` (prices and costs) and :mod:`~daemon.report.lanes` (the
  timeline's lanes and markers);
* :mod:`~daemon.report.timeline`: the picture (matplotlib, imported only there, only
  when drawing: the supervisor never loads it);
* :mod:`~daemon.report.html`: the page;
* :mod:`~daemon.report.cli`: the command (``main(argv)``, or ``configure_parser`` and
  ``run`` as a subcommand of ``spot-supervisor``).

Nothing here writes to the bucket or runs on the run's path: the report is read on an
operator's machine, while the run goes on or after it.
"""
