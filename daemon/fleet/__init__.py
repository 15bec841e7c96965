"""The fleet side: what launches, diagnoses and prices the instances the daemon runs on.

Nothing here runs on a training instance's ``run`` path (``daemon/cli.py`` imports these
modules only for their own subcommands); they run on an operator's machine or in CI.

- :mod:`daemon.fleet.userdata`: ``spot-supervisor user-data``, the cloud-init user-data
  that installs a run's config and starts the unit, in exactly the form the
  CloudFormation template ``deploy/aws/spot-training.yaml`` writes.
- :mod:`daemon.fleet.catalog`: the small tables we keep: vCPUs and Spot quota per
  instance type, and on-demand list prices (dated, with their source).
- :mod:`daemon.fleet.doctor`: ``spot-supervisor doctor``, why a fleet does not run:
  scaling activities, spot price history and offerings, each failure with its fix.
- :mod:`daemon.fleet.prices`: ``spot-supervisor prices``, spot against on-demand per
  region and Availability Zone.
"""
