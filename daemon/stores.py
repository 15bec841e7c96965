"""The run's object stores, built from the config: the checkpoint store and the ledger's own.

Building one sends no request (the first call does). What lives here is only the
wiring of ``checkpoints.remote`` and ``s3.*`` into a :class:`CheckpointStore`; how the
store talks to its service lives in :mod:`daemon.storage`, and nothing here decides
anything about the run.
"""

from __future__ import annotations

from daemon.config import Config
from daemon.storage.backend import build_blob_store, is_blob_remote
from daemon.storage.s3client import (
    checksum_algorithm,
    make_s3_client,
    make_transfer_config,
    parse_remote,
    use_crt,
)
from daemon.storage.store import CheckpointStore


def build_store(cfg: Config) -> CheckpointStore:
    """The S3 checkpoint store for this run, from the config."""
    if is_blob_remote(cfg.checkpoints.remote):
        return build_blob_store(cfg)  # gs:// or az://: the same store on another service
    location = parse_remote(cfg.checkpoints.remote)
    concurrency = cfg.s3.max_concurrency
    algo = checksum_algorithm(cfg.s3.checksum_algorithm)
    # A connection per concurrent request, plus headroom for the stager and listings.
    client = make_s3_client(
        cfg.s3.endpoint_url,
        cfg.s3.region,
        2 * concurrency + 2,
        request_checksums=algo is not None,
    )
    transfer = make_transfer_config(cfg.s3.part_size_mb * 1024 * 1024, concurrency)
    return CheckpointStore(
        client,
        location,
        cfg.run.id,
        transfer,
        checksum_algorithm=algo,
        crt=use_crt(cfg.s3.endpoint_url),
    )


def build_ledger_store(cfg: Config) -> CheckpointStore:
    """A store of its own for the run ledger: short timeouts and few retries, so a ledger
    write never holds a connection the commits need, and gives up quickly."""
    if is_blob_remote(cfg.checkpoints.remote):
        return build_blob_store(cfg, max_concurrency=1)
    client = make_s3_client(
        cfg.s3.endpoint_url,
        cfg.s3.region,
        2,
        max_attempts=2,
        connect_timeout=2.0,
        read_timeout=5.0,
        request_checksums=False,
    )
    transfer = make_transfer_config(cfg.s3.part_size_mb * 1024 * 1024, 1)
    return CheckpointStore(client, parse_remote(cfg.checkpoints.remote), cfg.run.id, transfer)
