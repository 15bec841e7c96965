"""spot-supervisor's daemon: restore, supervise the trainer, race checkpoints into S3.

Importing this package is cheap and pulls in neither boto3 nor torch: the training
library imports :mod:`daemon.layout` from here.
"""

__version__ = "0.1.0"
