"""Node enrolment, controller side: sign a node's CSR for its own name only.

Who may get a certificate for a name (`decide`, pure):
  - the holder of that name's current, unexpired certificate key (renewal: the CSR is
    signed by that key, which proves possession; no token needed);
  - otherwise the bootstrap token, for a name that has no identity yet;
  - a name that has one (a node cannot take another node's name, nor re-key its own)
    only after an operator's `nfctl certs approve NODE`, good for one enrolment.
The listener is TLS that agents verify, without client certificates."""

from __future__ import annotations

import asyncio
import datetime
import hmac
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.auth import server_credentials
from nfctl.controller.certs import key_fingerprint, load_ca, sign_node_certificate
from nfctl.controller.enrollments import Enrollment
from nfctl.controller.service_handlers import add_service
from nfctl.controller.storage import EnrollmentRecords, StoreUnavailable, open_enrollments

log = logging.getLogger(__name__)

# Kubernetes node names are DNS-1123 subdomains.
NODE_NAME_RE = re.compile(
    r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*\Z"
)
MAX_NODE_NAME = 253
MAX_CSR_BYTES = 16 << 10
DEFAULT_CERT_HOURS = 24.0
# Enrolment is a few small unary calls per node per day: tight limits before the token check.
LISTENER_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 10),
    ("grpc.max_concurrent_streams", 8),
    ("grpc.server.max_pending_requests", 64),
    ("grpc.server.max_pending_requests_hard_limit", 128),
    ("grpc.server_max_unrequested_time_in_server", 5),
    ("grpc.http2.max_pings_without_data", 2),
]


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def decide(
    node: str, key_sha256: str, token_ok: bool, current: Enrollment | None, now: float
) -> str:
    """The kind of enrolment this request is ("renewal", "first", "approved"), or Refused."""
    if current is not None and current.key_sha256 == key_sha256 and current.not_after > now:
        return "renewal"
    if not token_ok:
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            "enrolment needs the bootstrap token (or, to renew, a CSR signed by the key of "
            "the node's current certificate)",
        )
    if current is None:
        return "first"
    if current.reenrollment_approved:
        return "approved"
    raise Refused(
        grpc.StatusCode.PERMISSION_DENIED,
        f"node {node!r} is already enrolled with another key; an operator must approve a "
        f"new enrolment: nfctl certs approve {node}",
    )


def check_node_name(node: str) -> None:
    if len(node) > MAX_NODE_NAME or not NODE_NAME_RE.match(node):
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"invalid node name {node[:80]!r}: a DNS-1123 subdomain (lower case, digits, '-', '.')",
        )


def parse_csr(pem: bytes, node: str) -> x509.CertificateSigningRequest:
    if len(pem) > MAX_CSR_BYTES:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "CSR too large")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "not a PEM certificate request") from None
    if not csr.is_signature_valid:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "CSR signature is not valid")
    names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [node]:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT, f"CSR subject CN must be the node name {node!r}"
        )
    key = csr.public_key()
    strong = (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size >= 256) or (
        isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048
    )
    if not strong:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT, "CSR key must be EC (P-256 or larger) or RSA >= 2048"
        )
    return csr


@dataclass
class EnrollmentConfig:
    listen: str
    db: str  # the controller's --db: a SQLite file, or a postgresql:// URL shared by replicas
    ca_cert: Path
    ca_key: Path
    tls_cert: Path  # the controller's server certificate (agents verify it)
    tls_key: Path
    token_file: Path | None
    cert_hours: float = DEFAULT_CERT_HOURS
    replica: str = ""  # recorded with each certificate a PostgreSQL store issues


class EnrollmentService:
    def __init__(self, config: EnrollmentConfig, store: EnrollmentRecords) -> None:
        self.store = store
        self.ca_cert, self.ca_key = load_ca(config.ca_cert, config.ca_key)
        self.ca_pem = config.ca_cert.read_bytes()
        token = config.token_file.read_text().strip() if config.token_file else ""
        self.token = token.encode()
        self.valid = datetime.timedelta(hours=config.cert_hours)

    def _token_ok(self, given: str) -> bool:
        return bool(self.token) and hmac.compare_digest(
            given.encode("utf-8", errors="surrogateescape"), self.token
        )

    def enroll(self, request: pb.EnrollRequest, peer: str) -> pb.EnrollResponse:
        node = request.node
        check_node_name(node)
        csr = parse_csr(request.csr_pem, node)
        public_key = csr.public_key()
        fingerprint = key_fingerprint(public_key)
        kind = decide(
            node,
            fingerprint,
            self._token_ok(request.bootstrap_token),
            self.store.get(node),
            time.time(),
        )
        cert = sign_node_certificate(self.ca_cert, self.ca_key, node, public_key, self.valid)
        not_after = cert.not_valid_after_utc.timestamp()
        if not self.store.claim(
            kind, node, fingerprint, format(cert.serial_number, "x"), not_after
        ):
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {node!r} was enrolled by another request meanwhile",
            )
        log.info("node %s: %s enrolment from %s (key %s)", node, kind, peer, fingerprint[:16])
        return pb.EnrollResponse(
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
            ca_pem=self.ca_pem,
            not_after=not_after,
            renewal=kind == "renewal",
        )

    async def Enroll(self, request: pb.EnrollRequest, context: Any) -> pb.EnrollResponse:
        try:
            # the store may be PostgreSQL on another host: off the event loop that also
            # serves the agents' streams
            return await asyncio.to_thread(self.enroll, request, context.peer())
        except Refused as exc:
            log.warning(
                "enrolment of %r from %s refused: %s", request.node[:80], context.peer(), exc
            )
            await context.abort(exc.code, str(exc))
            raise  # abort raises; this keeps type checkers sure nothing is returned
        except StoreUnavailable as exc:
            # nothing was recorded (a certificate signed meanwhile is never sent): the
            # node's enrolment sidecar retries
            log.warning("enrolment of %r: %s", request.node[:80], exc)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "enrolment records are unavailable; retry later"
            )
            raise


class EnrollmentServer:
    """The enrolment listener, next to the controller's own (started by `nfctl controller
    --enroll-listen`)."""

    def __init__(self, config: EnrollmentConfig) -> None:
        self.config = config
        self.store = open_enrollments(config.db, replica=config.replica)
        self.service = EnrollmentService(config, self.store)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        cfg = self.config
        self.server = grpc.aio.server(options=LISTENER_OPTIONS, maximum_concurrent_rpcs=32)
        add_service("EnrollmentService", self.service, self.server)
        creds = server_credentials(
            cfg.ca_cert, cfg.tls_cert, cfg.tls_key, require_client_cert=False
        )
        self.port = self.server.add_secure_port(cfg.listen, creds)
        await self.server.start()
        log.info("enrolment listening on %s (TLS, bootstrap token)", cfg.listen)
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)
        self.store.close()
