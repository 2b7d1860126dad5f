"""Controller security: mTLS identities, impersonation, tokens, size limits, health,
reflection, webhook checks. Real controller in a namespace; raw gRPC clients."""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfctl.lab.topology import Topology
from tests.conftest import require_kernel
from tests.controller_harness import PY, REPO_ROOT, ControllerProcess, Pki, hub_python, new_topology

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Topology, Pki, Path]]:
    require_kernel()
    topo = new_topology(1)
    pki = Pki(tmp_path / "pki", topo, ["node1", "node2"])
    (tmp_path / "token").write_text("s3cret-operator-token\n")
    (tmp_path / "hook").write_text("hook-secret\n")
    controller = ControllerProcess(
        topo,
        pki,
        tmp_path / "controller.db",
        "--operator-listen",
        f"{topo.hub_ip}:9444",
        "--operator-token-file",
        str(tmp_path / "token"),
        "--webhook-secret-file",
        str(tmp_path / "hook"),
    ).start()
    try:
        yield topo, pki, tmp_path
    finally:
        controller.stop()
        topo.destroy()


CLIENT = """
import grpc, sys
from pathlib import Path
from nfctl.api.nfctl.v1 import nfctl_pb2 as pb, nfctl_pb2_grpc as pbg
from nfctl.wire.channel import channel_credentials
P = Path({pki!r})
def channel(cert=None, port=9443):
    crt = P / f"{{cert}}.crt" if cert else None
    key = P / f"{{cert}}.key" if cert else None
    creds = channel_credentials(P / "ca.crt", crt, key)
    return grpc.secure_channel("{hub}:%d" % port, creds)
def code(fn):
    try:
        fn(); return "OK"
    except grpc.RpcError as e:
        return e.code().name
def register(ch, node, status_bytes=0):
    def gen():
        yield pb.AgentMessage(register=pb.Register(node=node))
        if status_bytes:
            st = pb.NodeStatus(node=node, drift_mode="x" * status_bytes)
            yield pb.AgentMessage(status=pb.StatusReport(status=st))
            import time; time.sleep(1)
    for msg in pbg.AgentServiceStub(ch).Connect(gen(), timeout=5):
        pass
"""


def run_client(topo: Topology, pki: Pki, body: str) -> str:
    code = CLIENT.format(pki=str(pki.dir), hub=topo.hub_ip) + textwrap.dedent(body)
    return hub_python(topo, code).strip()


def test_identities_are_enforced(setup: tuple[Topology, Pki, Path]) -> None:
    topo, pki, _ = setup
    out = run_client(
        topo,
        pki,
        """
        list_nodes = lambda ch: pbg.FleetServiceStub(ch).ListNodes(pb.ListNodesRequest(), timeout=5)
        print("operator-cert", code(lambda: list_nodes(channel("operator"))))
        print("no-cert", code(lambda: list_nodes(channel(None))))
        print("node-cert-as-operator", code(lambda: list_nodes(channel("node1"))))
        print("agent-no-cert", code(lambda: register(channel(None), "node1")))
        print("impersonation", code(lambda: register(channel("node1"), "node2")))
        print("operator-as-agent", code(lambda: register(channel("operator"), "operator")))
        """,
    )
    results = dict(line.split() for line in out.splitlines())
    assert results == {
        "operator-cert": "OK",
        "no-cert": "UNAVAILABLE",  # the TLS handshake fails: client certificates are required
        "node-cert-as-operator": "UNAUTHENTICATED",
        "agent-no-cert": "UNAVAILABLE",
        "impersonation": "PERMISSION_DENIED",
        "operator-as-agent": "PERMISSION_DENIED",
    }


def test_operator_token_on_the_token_listener(setup: tuple[Topology, Pki, Path]) -> None:
    topo, pki, tmp = setup
    (tmp / "wrong").write_text("not-the-token")
    port = ["--controller", f"{topo.hub_ip}:9444"]
    cmd = [PY, "-m", "nfctl", "get", "nodes", "-o", "json", "--tls-ca", str(pki.dir / "ca.crt")]
    from nfctl.lab.topology import nsenter

    good = subprocess.run(
        [*nsenter(topo.hub), *cmd, *port, "--token-file", str(tmp / "token")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    bad = subprocess.run(
        [*nsenter(topo.hub), *cmd, *port, "--token-file", str(tmp / "wrong")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    none = subprocess.run(
        [*nsenter(topo.hub), *cmd, *port], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert good.returncode == 0 and good.stdout.strip() == "[]"
    assert bad.returncode != 0 and "UNAUTHENTICATED" in bad.stdout + bad.stderr
    assert none.returncode != 0 and "UNAUTHENTICATED" in none.stdout + none.stderr
    # agents cannot use the token listener at all: without the token the call is refused
    # before its method is looked up; with it, there is no agent service there
    out = run_client(
        topo,
        pki,
        """
        print(code(lambda: register(channel(None, port=9444), "node1")))
        md = (("authorization", "Bearer s3cret-operator-token"),)
        stub = pbg.AgentServiceStub(channel(None, port=9444))
        hello = [pb.AgentMessage(register=pb.Register(node="node1"))]
        print(code(lambda: list(stub.Connect(iter(hello), metadata=md, timeout=5))))
        """,
    )
    assert out.split() == ["UNAUTHENTICATED", "UNIMPLEMENTED"]


def test_oversized_agent_message_is_refused(setup: tuple[Topology, Pki, Path]) -> None:
    topo, pki, _ = setup
    out = run_client(
        topo, pki, 'print(code(lambda: register(channel("node1"), "node1", status_bytes=3 << 20)))'
    )
    assert out == "RESOURCE_EXHAUSTED"


def test_health_and_reflection(setup: tuple[Topology, Pki, Path]) -> None:
    topo, pki, _ = setup
    out = run_client(
        topo,
        pki,
        """
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        ch = channel("operator")
        for service in ("", "nfctl.v1.AgentService", "nfctl.v1.FleetService"):
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service))
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            print("health", service or "-", name)
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        for resp in stub.ServerReflectionInfo(iter([ask])):
            print("services", " ".join(sorted(s.name for s in resp.list_services_response.service)))
        """,
    )
    assert "health - SERVING" in out
    assert (
        "health nfctl.v1.AgentService SERVING" in out
        and "health nfctl.v1.FleetService SERVING" in out
    )
    services = next(line for line in out.splitlines() if line.startswith("services")).split()[1:]
    assert {"nfctl.v1.AgentService", "nfctl.v1.FleetService", "grpc.health.v1.Health"} <= set(
        services
    )


def test_webhook_checks(setup: tuple[Topology, Pki, Path]) -> None:
    topo, _, _ = setup
    out = hub_python(
        topo,
        textwrap.dedent(
            f"""
            import hashlib, hmac, json, urllib.request, urllib.error
            def post(path, body, headers):
                url = "http://{topo.hub_ip}:9080" + path
                req = urllib.request.Request(url, data=body, method="POST", headers=headers)
                try:
                    return urllib.request.urlopen(req, timeout=10).status
                except urllib.error.HTTPError as e:
                    return e.code
            body = json.dumps({{"ref": "refs/heads/main", "after": "a" * 40}}).encode()
            sig = "sha256=" + hmac.new(b"hook-secret", body, hashlib.sha256).hexdigest()
            print("github-good", post("/hooks/github", body, {{"X-Hub-Signature-256": sig}}))
            print("github-bad", post("/hooks/github", body, {{"X-Hub-Signature-256": "sha256=00"}}))
            ping = {{"X-Hub-Signature-256": sig, "X-GitHub-Event": "ping"}}
            print("github-ping", post("/hooks/github", body, ping))
            print("gitlab-good", post("/hooks/gitlab", body, {{"X-Gitlab-Token": "hook-secret"}}))
            print("gitlab-bad", post("/hooks/gitlab", body, {{"X-Gitlab-Token": "nope"}}))
            big = b"x" * (2 << 20)
            print("too-large", post("/hooks/github", big, {{"X-Hub-Signature-256": sig}}))
            garbage = b"not json"
            gsig = "sha256=" + hmac.new(b"hook-secret", garbage, hashlib.sha256).hexdigest()
            print("not-a-push", post("/hooks/github", garbage, {{"X-Hub-Signature-256": gsig}}))
            # non-ASCII (latin-1 and UTF-8 bytes on the wire): a bad signature, not a crash
            for name, value in (("latin1", "sha256=\u00e9"), ("utf8", "sha256=é".encode())):
                github = {{"X-Hub-Signature-256": value}}
                print("github-" + name, post("/hooks/github", body, github))
                print("gitlab-" + name, post("/hooks/gitlab", body, {{"X-Gitlab-Token": value}}))
            """
        ),
    )
    results = dict(line.split() for line in out.splitlines())
    assert results == {
        "github-good": "200",
        "github-bad": "401",
        "github-ping": "200",
        "gitlab-good": "200",
        "gitlab-bad": "401",
        "too-large": "413",
        "not-a-push": "400",
        "github-latin1": "401",
        "gitlab-latin1": "401",
        "github-utf8": "401",
        "gitlab-utf8": "401",
    }


def test_plaintext_only_on_loopback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            PY,
            "-m",
            "nfctl",
            "controller",
            "--insecure",
            "--listen",
            "0.0.0.0:19999",
            "--db",
            str(tmp_path / "x.db"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
    )
    assert proc.returncode == 2 and "loopback" in proc.stdout + proc.stderr
