"""The checkpoint layout on local disk and in object storage (CONTRACT §4, §5).

This module is the single definition of that format. It depends on the standard
library only, so the training library (which must not import boto3) and the
supervisor (which must not import torch) can both use it.

A checkpoint is complete exactly when ``<local_dir>/step-<9 digits>/`` exists and its
``manifest.json`` validates. Writers build it in ``.tmp-step-<9 digits>-<anything>/``,
write each file as ``<name>.partial`` then fsync and rename it, write the manifest
last, fsync the directory, rename it into place, and fsync ``local_dir``.

This module is the format's public face, the import path of every name the trainer and
the daemon use; the parts live by job: :mod:`daemon.layout_manifest` (the names of
checkpoint directories and what a manifest must say), :mod:`daemon.layout_verify`
(listing, reading and checking a checkpoint on disk, never through a symlink) and
:mod:`daemon.layout_writer` (writing one: files, manifest last, renames, fsyncs).
"""

from daemon.layout_manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_STEP,
    PARTIAL_SUFFIX,
    REASONS,
    STEP_DIGITS,
    TMP_PREFIX,
    FileEntry,
    Manifest,
    ManifestError,
    UnsafePathError,
    parse_manifest,
    parse_step_dir,
    parse_tmp_dir,
    step_dir_name,
    utc_now_iso,
)
from daemon.layout_verify import (
    HASH_CHUNK,
    list_step_dirs,
    load_complete,
    open_listed,
    read_manifest,
    sha256_file,
    verify_files,
)
from daemon.layout_writer import (
    CheckpointWriter,
    HashingWriter,
    fsync_dir,
    start_writeback,
    write_file,
)

__all__ = [
    "HASH_CHUNK",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "MAX_STEP",
    "PARTIAL_SUFFIX",
    "REASONS",
    "STEP_DIGITS",
    "TMP_PREFIX",
    "CheckpointWriter",
    "FileEntry",
    "HashingWriter",
    "Manifest",
    "ManifestError",
    "UnsafePathError",
    "fsync_dir",
    "list_step_dirs",
    "load_complete",
    "open_listed",
    "parse_manifest",
    "parse_step_dir",
    "parse_tmp_dir",
    "read_manifest",
    "sha256_file",
    "start_writeback",
    "step_dir_name",
    "utc_now_iso",
    "verify_files",
    "write_file",
]
