"""Object storage: everything the supervisor reads and writes in the run's bucket.

* :mod:`~daemon.storage.s3client`: the S3 client, transfer settings, errors, integrity
  rules (which ETags are MD5s), the cancel switch.
* :mod:`~daemon.storage.store`: :class:`~daemon.storage.store.CheckpointStore`, the one
  object the rest of the daemon talks to, composed of one layer per job:
  :mod:`~daemon.storage.objects` (keys, requests, small objects),
  :mod:`~daemon.storage.listing` (what is committed; complete.json),
  :mod:`~daemon.storage.verify` (does the server hold our bytes),
  :mod:`~daemon.storage.commit` (files first, manifest last),
  :mod:`~daemon.storage.retention` (what is deleted, what is aborted),
  :mod:`~daemon.storage.restore` (which checkpoint comes back, and how).
* :mod:`~daemon.storage.backend`: the same store on GCS (``gs://``,
  :mod:`~daemon.storage.gcs`) and Azure Blob Storage (``az://``,
  :mod:`~daemon.storage.azure_blob`): the S3-speaking methods overridden through one
  ``BlobBackend``.
* :mod:`~daemon.storage.download`: fetching and verifying one checkpoint's files.
* :mod:`~daemon.storage.sync`: the background thread that commits each new local
  checkpoint; :mod:`~daemon.storage.pipeline`: the emergency stager.
* :mod:`~daemon.storage.global_commit`: several nodes' parts, one commit.
* :mod:`~daemon.storage.lease`: the run's slots (who may train).

What must not live here: decisions about the trainer (the supervisor's and the
policy's), and anything that imports torch. The on-disk checkpoint layout shared with
the trainer is :mod:`daemon.layout`.
"""
