"""The controller's fleet, store, webhook and auth in the test process: real objects (a real
SQLite store in a temporary folder, the real webhook app behind aiohttp's test server, a
real gRPC server with the project's certificates on loopback), no controller process and
no namespaces. What an operator or an agent would see: what survives a restart, what an
agent is sent, who is let in."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.auth import AuthPolicy, OperatorTokenGate
from nfctl.controller.certs import init as issue_certificates
from nfctl.controller.event_ledger import EventLedger
from nfctl.controller.fleet import Fleet
from nfctl.controller.metrics import ControllerMetrics
from nfctl.controller.service import FleetService
from nfctl.controller.session import Session
from nfctl.controller.store import ControllerStore
from nfctl.controller.webhook import WebhookApp, github_signature
from nfctl.wire.channel import channel_credentials

# -- fleet and store -------------------------------------------------------------------------


def register(fleet: Fleet, node: str, epoch: str = "e1", **labels: str) -> Session:
    message = pb.Register(node=node, event_epoch=epoch, kernel="6.18", agent_version="t")
    message.labels.update(labels)
    _, session, _ = fleet.connect(message, peer="ipv4:127.0.0.1:1")
    return session


def status(
    node: str, applied: str, *functions: tuple[str, str, int], **labels: str
) -> pb.NodeStatus:
    """A status report as an agent sends it (its labels included)."""
    out = pb.NodeStatus(node=node, last_applied_revision=applied, last_attempted_revision=applied)
    out.labels.update(labels)
    out.source.url = "git://git.example/nfs.git"
    out.source.ref = "main"
    for name, state, program_id in functions:
        out.functions.add(name=name, state=state, revision=applied, program_id=program_id)
    return out


def event(sequence: int, reason: str = "Applied") -> pb.Event:
    return pb.Event(sequence=sequence, time=1000.0 + sequence, type="Normal", reason=reason)


def sent(session: Session) -> list[pb.ControllerMessage]:
    """The messages queued for an agent's stream so far."""
    out = []
    while session.outbox._items:
        item = session.outbox._items.popleft()
        assert item is not None
        out.append(pb.ControllerMessage.FromString(item))
    return out


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "controller.db"


def test_status_and_events_survive_a_controller_restart(db: Path) -> None:
    store = ControllerStore(db)
    fleet = Fleet(store)
    session = register(fleet, "node1", role="edge")
    entry = fleet.nodes["node1"]
    fleet.report_status(entry, status("node1", "c1", ("blocklist", "Applied", 41), role="edge"))
    fleet.add_events(entry, [event(1), event(2, "DriftCorrected")])
    fleet.flush()
    store.close()

    again = Fleet(ControllerStore(db))
    node = again.nodes["node1"]
    assert node.status.last_applied_revision == "c1"
    assert node.status.labels["role"] == "edge"
    assert [(f.name, f.program_id) for f in node.status.functions] == [("blocklist", 41)]
    history = again.store.history(node="node1")
    assert [(e.sequence, e.reason) for e in history] == [(1, "Applied"), (2, "DriftCorrected")]
    # the agent was told both events are stored: it may drop them from its log
    acks = [m.events_ack.event_sequence for m in sent(session) if m.HasField("events_ack")]
    assert acks == [2]


def test_resent_events_are_stored_once_and_a_gap_waits(db: Path) -> None:
    fleet = Fleet(ControllerStore(db))
    register(fleet, "node1")
    entry = fleet.nodes["node1"]
    assert [e.sequence for e in fleet.add_events(entry, [event(1), event(3)])] == [1, 3]
    assert fleet.add_events(entry, [event(1), event(3)]) == []  # a resend after reconnect
    assert entry.events.received == 1  # 2 is missing: nothing above it counts as complete
    fleet.add_events(entry, [event(2)])
    assert entry.events.received == 3
    fleet.flush()
    assert [e.sequence for e in fleet.store.history(node="node1")] == [1, 2, 3]


def test_an_agent_that_lost_old_events_is_not_waited_for() -> None:
    ledger = EventLedger("e1", received=3)
    ledger.accept(9)
    assert ledger.skip_to(7) == 3  # 4, 5 and 6 can never come
    assert ledger.received == 6 and ledger.lost == 3
    ledger.accept(7)
    ledger.accept(8)
    assert ledger.received == 9


def test_a_heartbeat_is_written_late_a_change_at_once(db: Path) -> None:
    fleet = Fleet(ControllerStore(db), persist_interval=3600)
    register(fleet, "node1")
    entry = fleet.nodes["node1"]
    fleet.report_status(entry, status("node1", "c1"))
    fleet.flush()
    heartbeat = status("node1", "c1")
    heartbeat.observed_at = 1234.0
    fleet.report_status(entry, heartbeat)
    fleet.flush()
    stored = fleet.store.load_node("node1")
    assert stored is not None and stored.status.observed_at == 0.0  # not yet: only a refresh
    fleet.report_status(entry, status("node1", "c2"))
    fleet.flush()
    stored = fleet.store.load_node("node1")
    assert stored is not None and stored.status.last_applied_revision == "c2"
    fleet.flush(everything=True)  # a graceful stop writes the rest as well


def test_selecting_nodes_and_summarizing_functions(db: Path) -> None:
    fleet = Fleet(ControllerStore(db))
    for name, role, state, prog in (
        ("node1", "edge", "Applied", 11),
        ("node2", "edge", "Failed", 12),
        ("node3", "core", "Applied", 13),
    ):
        register(fleet, name, role=role)
        report = status(name, "c1", ("blocklist", state, prog), role=role)
        fleet.report_status(fleet.nodes[name], report)
    by_label = fleet.select(pb.NodeSelector(labels={"role": "edge"}))
    assert [e.name for e in by_label] == ["node1", "node2"]
    assert [e.name for e in fleet.select(pb.NodeSelector(nodes=["node3", "nodeX"]))] == ["node3"]
    assert [e.name for e in fleet.select(None)] == ["node1", "node2", "node3"]
    (summary,) = fleet.functions()
    assert summary.name == "blocklist" and summary.nodes == 3
    assert dict(summary.versions[0].states) == {"Applied": 2, "Failed": 1}
    assert [(f.node, f.state) for f in summary.failing] == [("node2", "Failed")]


# -- webhook ---------------------------------------------------------------------------------

SECRET = b"s3cret"


def with_webhook(
    tmp_path: Path,
    check: Callable[[TestClient[Any, Any], Fleet, ControllerMetrics], Awaitable[None]],
) -> None:
    async def main() -> None:
        fleet = Fleet(ControllerStore(tmp_path / "controller.db"))
        metrics = ControllerMetrics(fleet)
        operators = FleetService(fleet, AuthPolicy(tls=False), metrics)  # type: ignore[abstract]
        hook = WebhookApp(fleet, operators.reconcile, SECRET, metrics)
        async with TestClient(TestServer(hook.app)) as client:
            await check(client, fleet, metrics)

    asyncio.run(main())


def push(ref: str = "refs/heads/main", after: str = "c" * 40) -> bytes:
    return json.dumps({"ref": ref, "after": after, "repository": {"name": "nfs"}}).encode()


def deliveries(metrics: ControllerMetrics, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "nfctl_controller_webhook_deliveries_total", {"provider": "github", "result": result}
    )
    return value or 0.0


def test_a_signed_push_makes_the_agents_on_that_branch_reconcile(tmp_path: Path) -> None:
    async def check(client: TestClient[Any, Any], fleet: Fleet, metrics: ControllerMetrics) -> None:
        on_main = register(fleet, "node1")
        fleet.report_status(fleet.nodes["node1"], status("node1", "c1"))
        on_other = register(fleet, "node2")
        other = status("node2", "c1")
        other.source.ref = "release"
        fleet.report_status(fleet.nodes["node2"], other)
        body = push()
        headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": github_signature(SECRET, body)}
        response = await client.post("/hooks/github", data=body, headers=headers)
        assert response.status == 200
        assert (await response.json())["nodes"] == ["node1"]
        (command,) = [m.command for m in sent(on_main) if m.HasField("command")]
        assert command.reconcile.revision == "c" * 40
        assert "github push to refs/heads/main" in command.reconcile.reason
        assert not [m for m in sent(on_other) if m.HasField("command")]
        assert deliveries(metrics, "delivered") == 1

    with_webhook(tmp_path, check)


def test_a_push_with_a_bad_signature_reaches_no_agent(tmp_path: Path) -> None:
    async def check(client: TestClient[Any, Any], fleet: Fleet, metrics: ControllerMetrics) -> None:
        session = register(fleet, "node1")
        fleet.report_status(fleet.nodes["node1"], status("node1", "c1"))
        body = push()
        for signature in ("sha256=" + "0" * 64, github_signature(b"wrong", body), "é"):
            response = await client.post(
                "/hooks/github", data=body, headers={"X-Hub-Signature-256": signature}
            )
            assert response.status == 401
        unsigned = await client.post("/hooks/github", data=body)
        assert unsigned.status == 401
        assert not [m for m in sent(session) if m.HasField("command")]
        assert deliveries(metrics, "bad_signature") == 4
        assert deliveries(metrics, "delivered") == 0

    with_webhook(tmp_path, check)


# -- auth ------------------------------------------------------------------------------------


def _auth_server(policy: AuthPolicy) -> grpc.GenericRpcHandler:
    """Two methods guarded as the controller guards its services: an operator call, and an
    agent call for the node named in the request."""

    async def operator_call(request: bytes, context: Any) -> bytes:
        await policy.require_operator(context)
        return b"ok"

    async def node_call(request: bytes, context: Any) -> bytes:
        await policy.require_node(context, request.decode())
        return b"ok"

    return grpc.method_handlers_generic_handler(
        "t.Guarded",
        {
            "Operator": grpc.unary_unary_rpc_method_handler(operator_call),
            "Node": grpc.unary_unary_rpc_method_handler(node_call),
        },
    )


def call(
    port: int, pki: Path, who: str | None, method: str, request: bytes, token: str = ""
) -> grpc.StatusCode:
    creds = channel_credentials(
        pki / "ca.crt",
        pki / f"{who}.crt" if who else None,
        pki / f"{who}.key" if who else None,
    )
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        stub: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/t.Guarded/{method}"
        )
        try:
            stub(request, timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def with_server(
    pki: Path, policy: AuthPolicy, client_certs: bool, check: Callable[[int], None]
) -> None:
    from nfctl.controller.auth import server_credentials

    async def main() -> None:
        interceptors = [] if client_certs else [OperatorTokenGate(policy)]
        server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers((_auth_server(policy),))
        creds = server_credentials(
            pki / "ca.crt", pki / "controller.crt", pki / "controller.key", client_certs
        )
        port = server.add_secure_port("localhost:0", creds)
        await server.start()
        try:
            await asyncio.to_thread(check, port)
        finally:
            await server.stop(None)

    asyncio.run(main())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    issue_certificates(folder, ["localhost"], ["node1", "node2"], ["operator"])
    return folder


def test_certificates_decide_who_is_an_operator_and_which_node(pki: Path) -> None:
    def check(port: int) -> None:
        assert call(port, pki, "operator", "Operator", b"") == grpc.StatusCode.OK
        assert call(port, pki, "node1", "Operator", b"") == grpc.StatusCode.UNAUTHENTICATED
        assert call(port, pki, "node1", "Node", b"node1") == grpc.StatusCode.OK
        # a node speaks only for itself; an operator is no agent
        assert call(port, pki, "node1", "Node", b"node2") == grpc.StatusCode.PERMISSION_DENIED
        assert call(port, pki, "operator", "Node", b"node1") == grpc.StatusCode.PERMISSION_DENIED

    with_server(pki, AuthPolicy(tls=True), client_certs=True, check=check)


def test_the_token_listener_lets_in_only_the_operator_token(pki: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    policy = AuthPolicy.create(tls=True, token_file=token_file)

    def check(port: int) -> None:
        assert call(port, pki, None, "Operator", b"", token="t0ken") == grpc.StatusCode.OK
        for token in ("", "wrong", "t0ken-and-more"):
            code = call(port, pki, None, "Operator", b"", token=token)
            assert code == grpc.StatusCode.UNAUTHENTICATED, token

    with_server(pki, policy, client_certs=False, check=check)
