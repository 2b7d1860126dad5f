"""The agent's own Node, read and watched through the Kubernetes API, for its labels.

Plain HTTPS with the pod's service-account token and CA (stdlib only: one GET and one
watch stream do not justify the official client's size). The watch follows the API's
protocol: list for a resourceVersion, watch from it (bookmarks keep it fresh), resume
after a dropped stream from the last version seen, relist on 410 Gone.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_TIMEOUT_SECONDS = 300  # the server ends each watch after this; we watch again
MAX_BACKOFF_SECONDS = 30.0


class KubeApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API: HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class KubeApi:
    """Where the API is and how to authenticate (the token is re-read on every request:
    projected service-account tokens rotate)."""

    url: str
    token_file: Path
    ca_file: Path | None

    @classmethod
    def in_cluster(cls, url: str | None = None) -> KubeApi:
        if url is None:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise KubeApiError(0, "KUBERNETES_SERVICE_HOST is not set (not in a pod?)")
            url = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
        return cls(url, SERVICE_ACCOUNT_DIR / "token", SERVICE_ACCOUNT_DIR / "ca.crt")

    def open(
        self, method: str, path: str, timeout: float, body: dict[str, Any] | None = None
    ) -> http.client.HTTPResponse:
        """One request; a 2xx response to read (and close), else KubeApiError."""
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("https", "http") or not parsed.hostname:
            raise ValueError(f"Kubernetes API URL {self.url!r} is not http(s)://host[:port]")
        conn: http.client.HTTPConnection
        if parsed.scheme == "http":
            conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
        else:
            cafile = str(self.ca_file) if self.ca_file else None
            context = ssl.create_default_context(cafile=cafile)
            conn = http.client.HTTPSConnection(
                parsed.hostname, parsed.port, timeout=timeout, context=context
            )
        headers = {
            "Authorization": f"Bearer {self.token_file.read_text().strip()}",
            "Accept": "application/json",
        }
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        if not 200 <= response.status < 300:
            text = response.read(4096).decode(errors="replace")
            conn.close()
            raise KubeApiError(response.status, _status_message(text))
        return response


@dataclass(frozen=True)
class NodeEvent:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK | ERROR
    resource_version: str | None
    labels: dict[str, str] | None
    status_code: int | None = None  # ERROR events carry a Status object


class NodeClient:
    def __init__(self, api: KubeApi, node: str, timeout: float = 30.0) -> None:
        self.api = api
        self.node = node
        self.timeout = timeout

    def _request(self, path: str, timeout: float) -> http.client.HTTPResponse:
        return self.api.open("GET", path, timeout)

    def get(self) -> tuple[dict[str, str], str]:
        """The Node's labels and resourceVersion."""
        name = urllib.parse.quote(self.node, safe="")
        response = self._request(f"/api/v1/nodes/{name}", self.timeout)
        try:
            node = json.loads(response.read())
        finally:
            response.close()
        meta = node.get("metadata") or {}
        return dict(meta.get("labels") or {}), str(meta.get("resourceVersion") or "")

    def watch(self, resource_version: str) -> Iterator[NodeEvent]:
        """Events after resource_version until the server ends the stream."""
        query = urllib.parse.urlencode(
            {
                "fieldSelector": f"metadata.name={self.node}",
                "watch": "true",
                "allowWatchBookmarks": "true",
                "resourceVersion": resource_version,
                "timeoutSeconds": str(WATCH_TIMEOUT_SECONDS),
            }
        )
        response = self._request(f"/api/v1/nodes?{query}", WATCH_TIMEOUT_SECONDS + 30)
        try:
            for line in response:
                if line.strip():
                    yield _event(json.loads(line))
        finally:
            response.close()


def _status_message(body: str) -> str:
    try:
        return str(json.loads(body).get("message") or body)
    except (ValueError, AttributeError):
        return body[:300]


def _event(raw: dict[str, Any]) -> NodeEvent:
    kind = str(raw.get("type", ""))
    obj = raw.get("object") or {}
    if kind == "ERROR":
        return NodeEvent(kind, None, None, status_code=int(obj.get("code") or 0))
    meta = obj.get("metadata") or {}
    version = meta.get("resourceVersion")
    labels = None if kind == "BOOKMARK" else dict(meta.get("labels") or {})
    return NodeEvent(kind, str(version) if version else None, labels)


class NodeLabelWatcher:
    """Calls on_labels with the Node's labels at start and after every change."""

    def __init__(
        self,
        client: NodeClient,
        on_labels: Callable[[dict[str, str]], None],
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.on_labels = on_labels
        self.on_error = on_error
        self.stopping = threading.Event()
        self.labels: dict[str, str] | None = None
        self.relists = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="k8s-node-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def _deliver(self, labels: dict[str, str]) -> None:
        if labels != self.labels:
            self.labels = labels
            self.on_labels(dict(labels))

    def run(self) -> None:
        version: str | None = None
        failures = 0
        while not self.stopping.is_set():
            try:
                if version is None:
                    labels, version = self.client.get()
                    self.relists += 1
                    self._deliver(labels)
                version = self._follow(version)
                failures = 0
            except KubeApiError as exc:
                if exc.status == 410:  # our version left the API's window: list again
                    version = None
                    continue
                failures = self._failed(str(exc), failures)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                failures = self._failed(f"Kubernetes API: {exc}", failures)

    def _follow(self, version: str) -> str | None:
        """Watch from version; returns where to resume (None: relist)."""
        for event in self.client.watch(version):
            if self.stopping.is_set():
                break
            if event.type == "ERROR":
                if event.status_code == 410:
                    return None
                raise KubeApiError(event.status_code or 500, "watch error event")
            if event.resource_version:
                version = event.resource_version
            if event.type in ("ADDED", "MODIFIED") and event.labels is not None:
                self._deliver(event.labels)
        return version

    def _failed(self, message: str, failures: int) -> int:
        log.warning("node labels: %s", message)
        if self.on_error is not None:
            self.on_error(message)
        delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2.0**failures)
        self.stopping.wait(delay)
        return failures + 1
