"""gcp-storage-emulator (PyPI) on loopback, for the tests and ``spot-supervisor demo
--cloud gcp``.

It runs in this process, on a thread; supervisor processes reach it through
``STORAGE_EMULATOR_HOST`` as google-cloud-storage does. Nothing here runs in production.

What gcp-storage-emulator 2026.7.19 does not model (read in its source, seen with
google-cloud-storage 3.x), and what this launcher adds:

- **Preconditions.** It ignores every ``ifGenerationMatch``, ``ifSourceGenerationMatch``
  and ``generation`` parameter: a create-only write overwrites, a read of a replaced
  generation returns the new bytes. This launcher adds them (:func:`_with_preconditions`):
  412 for a failed ``ifGenerationMatch`` / ``ifSourceGenerationMatch`` on uploads,
  rewrites, copies, reads and deletes, 404 for a ``generation`` that is not the live one
  (GCS without object versioning). A resumable upload's precondition is checked when the
  session starts; GCS checks it again when the upload completes.
- **Concurrency.** One request at a time (``http.server.HTTPServer``, HTTP/1.0): parallel
  uploads are serialised, so no throughput figure measured against it means anything.
- **Resumable sessions** are kept in memory until finished; an abandoned one is never
  expired, and nothing lists them (nor does GCS).
- **md5Hash** is computed over the bytes stored, as GCS does; an MD5 sent with a media
  upload is checked. ``crc32c`` likewise. No composite objects (no ``componentCount``).
- **Errors** are not GCS's: most failures are bare statuses without GCS's JSON error body;
  rate limits, 5xx, auth, IAM and retention policies are not modelled. Listing is never
  paginated.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

PRECONDITION_FAILED = {
    "error": {
        "code": 412,
        "message": "At least one of the pre-conditions you specified did not hold.",
        "errors": [{"reason": "conditionNotMet", "domain": "global"}],
    }
}


class GcsEmulatorUnavailable(RuntimeError):
    """gcp-storage-emulator is not installed."""


def _current_generation(storage: Any, bucket: str, name: str | None) -> str:
    from gcp_storage_emulator.exceptions import NotFound

    if not name:
        return "0"
    try:
        return str(storage.get_file_obj(bucket, name).get("generation") or "0")
    except NotFound:
        return "0"


def _query(request: Any, name: str) -> str | None:
    values = request.query.get(name)
    return values[0] if values else None


def _object_name(request: Any) -> str | None:
    name = _query(request, "name") or request.params.get("object_id")
    if name is None and isinstance(request.data, dict):
        meta = request.data.get("meta")
        name = meta.get("name") if isinstance(meta, dict) else request.data.get("name")
    return str(name) if name else None


def _with_preconditions(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap one emulator handler with what GCS checks before it acts."""

    def checked(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        bucket = request.params.get("bucket_name")
        if "upload_id" not in request.query:  # a resumable session's chunks: checked at start
            name = _object_name(request)
            current = _current_generation(storage, bucket, name)
            match = _query(request, "ifGenerationMatch")
            if match is not None and match != current:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json(PRECONDITION_FAILED)
                return None
            generation = _query(request, "generation")
            if generation is not None and request.method == "GET" and generation != current:
                response.status = HTTPStatus.NOT_FOUND
                return None
            source = _query(request, "ifSourceGenerationMatch")
            if source is not None and source != current:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json(PRECONDITION_FAILED)
                return None
        return handler(request, response, storage, *args, **kwargs)

    checked.__wrapped__ = handler  # type: ignore[attr-defined]
    return checked


def _install_preconditions() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    wrapped = {
        objects.insert, objects.upload_partial, objects.download, objects.get,
        objects.delete, objects.rewrite, objects.copy, objects.xml_upload,
    }  # fmt: skip
    for _regex, handlers in server.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn in wrapped:
                handlers[method] = _with_preconditions(fn)


@dataclass
class GcsEmulator:
    """gcp-storage-emulator on 127.0.0.1; ``host`` is ``STORAGE_EMULATOR_HOST``'s value."""

    host: str
    _server: Any

    def env(self) -> dict[str, str]:
        """What a process needs to reach it (anonymously) instead of GCS."""
        return {"STORAGE_EMULATOR_HOST": self.host}

    def create_bucket(self, name: str) -> None:
        from gcp_storage_emulator.handlers import buckets

        buckets.create_bucket(name, self._server._storage)

    def stop(self) -> None:
        self._server.stop()


_installed = False


def start_gcs_emulator() -> GcsEmulator:
    """Start the emulator (in memory) on a free loopback port, preconditions added."""
    global _installed
    try:
        from gcp_storage_emulator.server import create_server
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise GcsEmulatorUnavailable(
            "gcp-storage-emulator is not installed: pip install 'spot-supervisor[demo]'"
        ) from exc
    if not _installed:
        _install_preconditions()
        _installed = True
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    logging.getLogger("api.object").setLevel(logging.CRITICAL)
    logging.getLogger("api.bucket").setLevel(logging.CRITICAL)
    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    port = server._api._httpd.server_address[1]
    return GcsEmulator(f"http://127.0.0.1:{port}", server)


@contextlib.contextmanager
def emulator_environment(emulator: GcsEmulator) -> Iterator[None]:
    """``STORAGE_EMULATOR_HOST`` set in this process for the duration."""
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.host
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
