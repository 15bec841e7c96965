"""Object storage: everything the supervisor reads and writes in the run's bucket.

* :mod:`~daemon.storage.s3client`: the S3 client and transfer settings;
  :mod:`~daemon.storage.locations` (``s3://``, ``gs://``, ``az://`` remotes),
  :mod:`~daemon.storage.errors` (StoreError and how a failure is described),
  :mod:`~daemon.storage.etags` (ETag maths, the MD5 fed by an upload's reads),
  :mod:`~daemon.storage.integrity` (which ETags are MD5s, per endpoint),
  :mod:`~daemon.storage.cancel` (the cancel switch at the drain deadline).
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
  ``BlobBackend`` (:mod:`~daemon.storage.blob`; file ends: :mod:`~daemon.storage.blob_io`).
* :mod:`~daemon.storage.download`: fetching and verifying one checkpoint's files.
* :mod:`~daemon.storage.sync`: the background thread that commits each new local
  checkpoint (its file watch: :mod:`~daemon.storage.fswatch`; emergency commits
  verified after the fact: :mod:`~daemon.storage.pending`);
  :mod:`~daemon.storage.pipeline`: the emergency stager, which follows each file as it is
  written (:mod:`~daemon.storage.tail`) and whose work the commit checks
  (:mod:`~daemon.storage.staged`).
* :mod:`~daemon.storage.global_commit`: several nodes' parts, one commit.
* :mod:`~daemon.storage.lease`: the run's slots (who may train).

What must not live here: decisions about the trainer (the supervisor's and the
policy's), and anything that imports torch. The on-disk checkpoint layout shared with
the trainer is :mod:`daemon.layout`.
"""
