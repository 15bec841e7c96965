"""Stand-ins for the cloud, for the demo and the tests: never imported by production code.

* :mod:`~daemon.standins.s3`: moto's S3 server on loopback, and fake credentials.
* :mod:`~daemon.standins.emulator`: an EC2 metadata service (IMDSv2) emulator, with
  GCE metadata server and Azure Scheduled Events modes.
* :mod:`~daemon.standins.gcs`: gcp-storage-emulator on loopback (GCS), preconditions added.
* :mod:`~daemon.standins.azurite`: Azurite's Blob service on loopback (Azure Blob Storage).
* :mod:`~daemon.standins.npm`: what the launchers of npm-installed servers share
  (Azurite here, s3rver in ``tests/s3rver.py``): finding node and the package, stopping.
* :mod:`~daemon.standins.faultproxy`: a fault-injecting HTTP proxy for S3.
* :mod:`~daemon.standins.demo`: ``spot-supervisor demo`` (the one command that may
  import stand-ins; the CLI imports it only inside that command), and the helpers the
  tests use to run real supervisor processes.
* :mod:`~daemon.standins.instances`: several simulated instances of one run on this
  machine (a supervisor, metadata emulator, local and runtime dir each; one bucket), for
  the multi-node and standby tests and ``python -m bench fleet``.

``tests/test_boundaries.py`` imports the daemon with this package made unimportable.
"""

from daemon.standins.s3 import (
    FAKE_AWS_ENV,
    LocalS3,
    StandinUnavailable,
    start_local_s3,
    use_fake_aws_credentials,
)

__all__ = [
    "FAKE_AWS_ENV",
    "LocalS3",
    "StandinUnavailable",
    "start_local_s3",
    "use_fake_aws_credentials",
]
