"""The fault proxy's HTTP control API, for a proxy running in another process.

On ``/__faultproxy__/``, a prefix S3 never uses: ``GET stats``, ``GET rules``,
``POST rules`` with a rule as JSON (:meth:`.rules.Rule.from_dict`), ``DELETE rules``.
Control requests are answered by the proxy itself and are not counted in its stats.
"""

from __future__ import annotations

import json
import re
import socket
from typing import TYPE_CHECKING, Any

from daemon.standins.faultproxy.rules import Rule
from daemon.standins.faultproxy.wire import MAX_HEAD, Message, Reader, render_head

if TYPE_CHECKING:
    from daemon.standins.faultproxy.proxy import FaultProxy

CONTROL_PREFIX = "/__faultproxy__/"
CONTROL_STATS_PATH = CONTROL_PREFIX + "stats"
CONTROL_RULES_PATH = CONTROL_PREFIX + "rules"


def serve_control(
    proxy: FaultProxy,
    client: socket.socket,
    reader: Reader,
    req: Message,
    method: str,
    target: str,
    version: str,
) -> bool:
    """Answer one control request; whether the client connection may serve another."""
    length = req.content_length() or 0
    if length > MAX_HEAD:
        raise ValueError("control request too large")
    body = b""
    while len(body) < length:
        data = reader.read_some(length - len(body))
        if not data:
            raise ConnectionError("client closed inside a control request")
        body += data
    path = target.split("?", 1)[0]
    status: int = 200
    doc: Any = {}
    if path == CONTROL_STATS_PATH and method == "GET":
        doc = proxy.stats().to_dict()
    elif path == CONTROL_RULES_PATH and method == "GET":
        doc = {"rules": [r.to_dict() for r in proxy.rules]}
    elif path == CONTROL_RULES_PATH and method == "POST":
        try:
            spec = json.loads(body or b"{}")
            if not isinstance(spec, dict):
                raise ValueError("a rule is a JSON object")
            doc = proxy.add(Rule.from_dict(spec)).to_dict()
        except (ValueError, re.error) as exc:
            status, doc = 400, {"error": str(exc)}
    elif path == CONTROL_RULES_PATH and method == "DELETE":
        proxy.clear()
        doc = {"rules": []}
    else:
        status, doc = 404, {"error": f"no control endpoint {method} {path}"}
    payload = json.dumps(doc).encode() + b"\n"
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(payload))),
    ]
    client.sendall(render_head(f"HTTP/1.1 {status} {reason}", headers) + payload)
    return not req.wants_close(version)
