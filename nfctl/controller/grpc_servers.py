"""The replica's gRPC servers: the agent listener (mTLS, agent and operator services), the
operator token listener (TLS without client certificates) and the plaintext probe listener,
with the limits and options each needs."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.agent_service import AgentService
from nfctl.controller.auth import AuthPolicy, OperatorTokenGate, server_credentials
from nfctl.controller.reflection import enable_reflection
from nfctl.controller.service import FleetService
from nfctl.controller.service_handlers import add_service

# grpc.aio takes new calls from gRPC core one at a time; calls core holds meanwhile are
# "pending". Core's defaults (1,000 soft / 3,000 hard, 30 s) shed most of a reconnect storm
# of thousands of agents (they see CANCELLED and back off); a queue that big is fine here.
MAX_PENDING_CALLS = 100_000
MAX_UNREQUESTED_SECONDS = 300
# The operator token listener takes connections without client certificates: anyone who
# can reach it gets this much before the token is checked (OperatorTokenGate refuses a call
# without it at once). Operators run a few calls and watches each.
OPERATOR_MAX_STREAMS = 16
OPERATOR_LISTENER_LIMITS = [
    ("grpc.max_concurrent_streams", OPERATOR_MAX_STREAMS),
    ("grpc.max_allowed_incoming_connections", 256),
    ("grpc.server.max_pending_requests", 64),
    ("grpc.server.max_pending_requests_hard_limit", 128),
    ("grpc.server_max_unrequested_time_in_server", 5),
    ("grpc.server_handshake_timeout_ms", 10_000),
]
# HTTP/2 BDP probing answers received data with PINGs to size flow-control windows for bulk
# transfers. Agents send a few KB every few seconds, well inside the default window; with
# 10,000 connections the probes cost gRPC's threads ~40% more CPU for nothing.
BDP_PROBE = 0
# TLS: the size of the buffer each connection's frame protector keeps (default 16 KB).
# Agent messages are a few KB; 4 KB records save ~12 KB a connection (120 MB at 10,000).
TLS_FRAME_BYTES = 4096


def grpc_server(
    max_message_bytes: int,
    auth: AuthPolicy,
    operators: FleetService,
    agents: AgentService | None,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The operator service, and the agent service when `agents` is given (the agent
    listener; without it the operator token listener, whose calls pass the token gate
    first), with health and reflection. Returns the server and its health servicer."""
    with_agents = agents is not None
    if with_agents:
        limits: list[tuple[str, int]] = [
            ("grpc.max_concurrent_streams", 200_000),
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            ("grpc.server_max_unrequested_time_in_server", MAX_UNREQUESTED_SECONDS),
        ]
        interceptors: list[grpc.aio.ServerInterceptor] = []
    else:
        limits = OPERATOR_LISTENER_LIMITS
        interceptors = [OperatorTokenGate(auth)]
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            *limits,
            ("grpc.http2.bdp_probe", BDP_PROBE),
            ("grpc.tsi.max_frame_size", TLS_FRAME_BYTES),
        ],
        interceptors=interceptors,
    )
    names = [pb.DESCRIPTOR.services_by_name["FleetService"].full_name]
    add_service("FleetService", operators, server)
    if agents is not None:
        add_service("AgentService", agents, server)
        names.append(pb.DESCRIPTOR.services_by_name["AgentService"].full_name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection([*names, health.SERVICE_NAME], server)
    return server, health_servicer


def add_tls_port(
    server: grpc.aio.Server,
    address: str,
    tls: tuple[Path, Path, Path],
    require_client_cert: bool,
) -> int:
    """Listen on `address` with TLS (ca, cert, key); returns the port bound."""
    ca, cert, key = tls
    creds = server_credentials(ca, cert, key, require_client_cert=require_client_cert)
    return server.add_secure_port(address, creds)


def probe_server() -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """Plaintext, no client certificate: grpc.health.v1.Health and nothing else (no
    reflection, no fleet service), for kubelet `grpc:` probes and load balancers."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4096)])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return server, servicer
