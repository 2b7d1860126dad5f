"""Node enrolment, agent side: the node's key is made here and never leaves the node.

`enroll` creates the key once (mode 0600 in a 0700 folder), sends a CSR for the node's name
to the controller's enrolment listener over TLS verified with the CA certificate, and
writes the returned certificate next to the key (atomically: the agent reads both whenever
it connects). The same key is kept across renewals: signing a CSR with it is the proof of
owning the current certificate."""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
from nfctl.wire.channel import open_channel

log = logging.getLogger(__name__)

KEY_FILE = "node.key"
CERT_FILE = "node.crt"
RENEW_AT_FRACTION = 2 / 3  # of the certificate's lifetime
RETRY_SECONDS = 30.0


@dataclass(frozen=True)
class Identity:
    key: Path
    cert: Path
    not_after: float
    renewal: bool


def ensure_key(folder: Path) -> ec.EllipticCurvePrivateKey:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / KEY_FILE
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(path, data, 0o600)
    return key


def certificate_request(key: ec.EllipticCurvePrivateKey, node: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def enroll(
    controller: str,
    ca: Path,
    node: str,
    folder: Path,
    token: str | None,
    timeout: float = 30.0,
    server_name: str | None = None,
) -> Identity:
    """One enrolment or renewal; raises grpc.RpcError with the controller's reason."""
    key = ensure_key(folder)
    request = pb.EnrollRequest(
        node=node, csr_pem=certificate_request(key, node), bootstrap_token=token or ""
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    with open_channel(controller, insecure=False, ca=ca, options=options) as channel:
        reply: pb.EnrollResponse = pbg.EnrollmentServiceStub(channel).Enroll(
            request, timeout=timeout
        )
    cert = x509.load_pem_x509_certificate(reply.certificate_pem)
    if cert.public_key() != key.public_key():
        raise ValueError("the controller returned a certificate for another key")
    cert_path = folder / CERT_FILE
    _write_atomically(cert_path, reply.certificate_pem, 0o644)
    return Identity(folder / KEY_FILE, cert_path, reply.not_after, reply.renewal)


def renew_delay(cert_path: Path, now: float) -> float:
    """Seconds until the certificate in cert_path is due for renewal (0 if due or absent)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return 0.0
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    return max(0.0, start + (end - start) * RENEW_AT_FRACTION - now)


def keep_enrolled(
    controller: str,
    ca: Path,
    node: str,
    folder: Path,
    token: str | None,
    server_name: str | None = None,
) -> None:
    """Renew before expiry, forever (a sidecar next to the agent)."""
    while True:
        delay = renew_delay(folder / CERT_FILE, time.time())
        if delay > 0:
            time.sleep(delay)
        try:
            identity = enroll(controller, ca, node, folder, token, server_name=server_name)
            log.info(
                "node %s: certificate %s until %s",
                node,
                "renewed" if identity.renewal else "issued",
                datetime.datetime.fromtimestamp(identity.not_after, datetime.UTC).isoformat(),
            )
        except (grpc.RpcError, OSError, ValueError) as exc:
            log.warning(
                "node %s: enrolment failed, retrying in %.0f s: %s", node, RETRY_SECONDS, exc
            )
            time.sleep(RETRY_SECONDS)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
