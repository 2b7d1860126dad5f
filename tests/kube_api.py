"""A stand-in for the Kubernetes API's Node endpoints, over real HTTPS with bearer tokens.

No Kubernetes API server can run on this machine; this one answers the two requests the
agent makes, in the API's own wire format: GET /api/v1/nodes/<name> (a Node object) and
GET /api/v1/nodes?fieldSelector=metadata.name=<name>&watch=true&resourceVersion=<rv>
(a chunked stream of JSON watch events: ADDED/MODIFIED/BOOKMARK/ERROR), including
"410 Gone" both as an HTTP status and as an ERROR event once a version is compacted away.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import json
import os
import queue
import socket
import ssl
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from nfctl.controller import certs

CLONE_NEWNET = 0x40000000
_CLOSE = object()


def node_object(name: str, labels: dict[str, str], resource_version: int) -> dict[str, Any]:
    """A Node as `kubectl get node -o json` shows one (trimmed of nothing the agent reads)."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": "3f1c3e2a-6c55-4a1e-9d7e-2f0b6f1d9a01",
            "resourceVersion": str(resource_version),
            "creationTimestamp": "2026-12-01T09:00:00Z",
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                **labels,
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]},
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": "2026-12-02T20:00:00Z",
                    "lastTransitionTime": "2026-12-01T09:01:00Z",
                }
            ],
            "nodeInfo": {
                "kernelVersion": os.uname().release,
                "kubeletVersion": "v1.32.4",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    }


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeNodeApi:
    def __init__(
        self, tls_dir: Path, node: str, labels: dict[str, str], netns: str | None = None
    ) -> None:
        self.node = node
        self.labels = dict(labels)
        self.version = 100
        self.oldest = 0  # versions below this are compacted: watching from them is 410
        self.token = "k8s-test-token-" + os.urandom(8).hex()
        self.lock = threading.Lock()
        self.watchers: list[queue.Queue[object]] = []
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.events: list[dict[str, Any]] = []  # POSTed core/v1 Events
        issued = certs.issue(
            tls_dir, "apiserver", "127.0.0.1", None, ["127.0.0.1"], client=False, server=True
        )
        self.ca_file = tls_dir / "ca.crt"
        self.token_file = tls_dir / "token"
        self.token_file.write_text(self.token + "\n")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.cert, issued.key)
        self.server = _Server(self, ("127.0.0.1", 0), bind_and_activate=False)
        self.server.socket = context.wrap_socket(_listen(netns), server_side=True)
        self.port = self.server.socket.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeNodeApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.close_watches()
        self.server.shutdown()
        self.server.server_close()

    # -- what a test does to the cluster -----------------------------------------------------
    def node_json(self) -> dict[str, Any]:
        return node_object(self.node, self.labels, self.version)

    def set_labels(self, labels: dict[str, str], notify: bool = True) -> None:
        """`kubectl label node`: a new resourceVersion and a MODIFIED event."""
        with self.lock:
            self.labels = dict(labels)
            self.version += 1
            if notify:
                self._send({"type": "MODIFIED", "object": self.node_json()})

    def bookmark(self) -> int:
        with self.lock:
            self.version += 7  # other objects changed meanwhile
            self._send(
                {
                    "type": "BOOKMARK",
                    "object": {
                        "kind": "Node",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(self.version)},
                    },
                }
            )
            return self.version

    def compact(self, as_event: bool) -> None:
        """etcd compaction: every version so far is gone; open watches get 410 (as an ERROR
        event, or, as_event=False, only on their next request)."""
        with self.lock:
            self.version += 1
            self.oldest = self.version
            if as_event:
                old = self.oldest - 1
                self._send(
                    {
                        "type": "ERROR",
                        "object": status_object(
                            410, "Expired", f"too old resource version: {old} ({self.oldest})"
                        ),
                    }
                )
        self.close_watches()

    def close_watches(self) -> None:
        """The API server ends watch streams (timeoutSeconds, restarts, load balancers)."""
        with self.lock:
            for q in self.watchers:
                q.put(_CLOSE)

    def watch_count(self) -> int:
        return sum(1 for path, q in self.requests if q.get("watch") == "true")

    def get_count(self) -> int:
        return sum(1 for path, _ in self.requests if path.endswith(f"/nodes/{self.node}"))

    def _send(self, event: dict[str, Any]) -> None:
        for q in self.watchers:
            q.put(copy.deepcopy(event))


def _listen(netns: str | None) -> socket.socket:
    """A listening socket, created inside a network namespace when one is given (setns in a
    short-lived thread: only that thread switches namespace)."""
    made: list[socket.socket] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            if netns:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
            made.append(sock)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return made[0]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, api: FakeNodeApi, address: tuple[str, int], bind_and_activate: bool) -> None:
        super().__init__(address, _Handler, bind_and_activate=bind_and_activate)
        self.api = api


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        api = self.server.api
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        api.requests.append((url.path, query))
        if self.headers.get("Authorization") != f"Bearer {api.token}":
            self._json(401, status_object(401, "Unauthorized", "Unauthorized"))
            return
        if url.path == f"/api/v1/nodes/{api.node}":
            with api.lock:
                self._json(200, api.node_json())
        elif url.path == "/api/v1/nodes" and query.get("watch") == "true":
            self._watch(api, query)
        else:
            self._json(404, status_object(404, "NotFound", f"{url.path} not found"))

    def do_POST(self) -> None:
        api = self.server.api
        path = urllib.parse.urlsplit(self.path).path
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        if self.headers.get("Authorization") != f"Bearer {api.token}":
            self._json(401, status_object(401, "Unauthorized", "Unauthorized"))
            return
        parts = path.split("/")  # /api/v1/namespaces/<ns>/events
        if len(parts) == 6 and parts[1:4] == ["api", "v1", "namespaces"] and parts[5] == "events":
            if body.get("kind") != "Event" or body["metadata"].get("namespace") != parts[4]:
                self._json(400, status_object(400, "BadRequest", "not an Event of this ns"))
                return
            with api.lock:
                api.events.append(body)
            self._json(201, body)
        else:
            self._json(404, status_object(404, "NotFound", f"{path} not found"))

    def _json(self, code: int, data: dict[str, Any]) -> None:
        body = json.dumps(data).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _watch(self, api: FakeNodeApi, query: dict[str, str]) -> None:
        assert query.get("fieldSelector") == f"metadata.name={api.node}", query
        events: queue.Queue[object] = queue.Queue()
        with api.lock:
            since = int(query.get("resourceVersion") or 0)
            if since < api.oldest:
                message = f"too old resource version: {since} ({api.oldest})"
                self._json(410, status_object(410, "Expired", message))
                return
            if since < api.version:  # changes the client has not seen yet
                events.put({"type": "MODIFIED", "object": api.node_json()})
            api.watchers.append(events)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                event = events.get()
                if event is _CLOSE:
                    break
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass
        finally:
            with api.lock:
                api.watchers.remove(events)
            self.close_connection = True
