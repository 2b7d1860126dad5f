"""Who is calling: agents by client certificate (O=nfctl-nodes, CN=<node name>), operators
by client certificate (O=nfctl-operators) or bearer token."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

NODES_ORG = "nfctl-nodes"
OPERATORS_ORG = "nfctl-operators"


@dataclass(frozen=True)
class Identity:
    """The caller's client certificate, as far as authorisation needs it."""

    common_name: str | None
    organization: str | None

    @property
    def is_node(self) -> bool:
        return self.organization == NODES_ORG and bool(self.common_name)

    @property
    def is_operator(self) -> bool:
        return self.organization == OPERATORS_ORG


def identity(context: Any) -> Identity:
    auth = context.auth_context()
    subject = b",".join(auth.get("x509_subject", [])).decode(errors="replace")
    fields = dict(part.split("=", 1) for part in subject.split(",") if "=" in part)
    cn = auth.get("x509_common_name", [b""])[0].decode(errors="replace") or fields.get("CN")
    return Identity(common_name=cn or None, organization=fields.get("O"))


@dataclass
class AuthPolicy:
    """Who may call what: operators by certificate group or bearer token, agents by a node
    certificate for their own name only; --insecure without a token leaves calls open."""

    tls: bool
    operator_token: str | None = None

    @classmethod
    def create(cls, tls: bool, token_file: Path | None) -> AuthPolicy:
        token = token_file.read_text().strip() if token_file else None
        return cls(tls=tls, operator_token=token or None)

    def bearer_ok(self, context: Any) -> bool:
        return self.bearer_in(context.invocation_metadata())

    def bearer_in(self, metadata: Any) -> bool:
        if not self.operator_token:
            return False
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                given = value[7:].strip().encode("utf-8", errors="surrogateescape")
                return hmac.compare_digest(given, self.operator_token.encode())
        return False

    async def require_operator(self, context: Any) -> None:
        if self.bearer_ok(context):
            return
        if self.tls and identity(context).is_operator:
            return
        if not self.tls and not self.operator_token:
            return  # --insecure on loopback without a token: open by explicit choice
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "operator calls need a client certificate of the nfctl-operators group "
            "or 'authorization: Bearer <token>'",
        )

    async def require_node(self, context: Any, claimed: str) -> None:
        if not self.tls:
            return  # --insecure: no identities to check
        who = identity(context)
        if not who.is_node:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "agents need a client certificate of the nfctl-nodes group",
            )
        if who.common_name != claimed:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate is for node {who.common_name!r}, not {claimed!r}",
            )


class OperatorTokenGate(grpc.aio.ServerInterceptor):
    """The token listener (TLS without client certificates) refuses a call without the
    operator token before any handler runs or any request is read, so unauthenticated
    clients hold no handler, no watcher and no queued message (health checks stay open)."""

    OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})

    def __init__(self, policy: AuthPolicy) -> None:
        self.policy = policy

        async def deny(request_iterator: Any, context: Any) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this listener needs 'authorization: Bearer <operator token>'",
            )

        # stream request type: the refusal does not wait for the client's request message
        self._deny: grpc.RpcMethodHandler[Any, Any] = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        if handler_call_details.method in self.OPEN_METHODS or self.policy.bearer_in(
            handler_call_details.invocation_metadata
        ):
            return await continuation(handler_call_details)
        return self._deny


def server_credentials(
    ca: Path, cert: Path, key: Path, require_client_cert: bool
) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca.read_bytes(),
        require_client_auth=require_client_cert,
    )
