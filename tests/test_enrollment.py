"""Per-node identity: agents make their key on the node and enrol with the controller.

A real controller (subprocess, mTLS agent listener and TLS enrolment listener on loopback,
real SQLite), the real `nfctl certs enroll` / `nfctl certs approve` commands, and raw gRPC
clients that register on the agent listener with the certificates enrolment produced."""

from __future__ import annotations

import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
from nfctl.wire.channel import channel_credentials
from tests.loopback_controller import free_port, make_pki, nfctl, running_controller

pytestmark = pytest.mark.e2e

TOKEN = "bootstrap-7d0c1f3a9e"


@dataclass
class Controller:
    tmp: Path
    pki: Path
    db: Path
    agent_address: str
    enroll_address: str

    def enroll(
        self, node: str, folder: Path, token: str | None = TOKEN
    ) -> subprocess.CompletedProcess[str]:
        args = ["certs", "enroll", "--node", node, "--controller", self.enroll_address]
        args += ["--tls-ca", str(self.pki / "ca.crt"), "--dir", str(folder)]
        if token is not None:
            token_file = self.tmp / f"token-{time.monotonic_ns()}"
            token_file.write_text(token + "\n")
            args += ["--token-file", str(token_file)]
        return nfctl(*args)

    def register(self, folder: Path, node: str) -> str:
        """Register on the agent listener with the enrolled identity in folder."""
        creds = channel_credentials(self.pki / "ca.crt", folder / "node.crt", folder / "node.key")
        with grpc.secure_channel(self.agent_address, creds) as channel:
            stream = pbg.AgentServiceStub(channel).Connect(
                iter([pb.AgentMessage(register=pb.Register(node=node))]), timeout=10
            )
            try:
                first = next(stream)
            except grpc.RpcError as exc:
                return str(exc.code().name)
            stream.cancel()
            return "OK" if first.HasField("registered") else "UNEXPECTED"


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "bootstrap").write_text(TOKEN + "\n")
    ctl = Controller(
        tmp_path,
        pki,
        tmp_path / "controller.db",
        f"127.0.0.1:{free_port()}",
        f"127.0.0.1:{free_port()}",
    )
    enrolment = [
        "--tls-ca-key", str(pki / "ca.key"),
        "--enroll-listen", ctl.enroll_address,
        "--enroll-token-file", str(tmp_path / "bootstrap"),
        "--enroll-cert-hours", "1",
    ]  # fmt: skip
    with running_controller(tmp_path, pki, ctl.agent_address, *enrolment):
        yield ctl


def certificate(folder: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((folder / "node.crt").read_bytes())


def test_enrolled_node_connects_as_itself_only(controller: Controller, tmp_path: Path) -> None:
    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    for name, folder in (("node-a", node_a), ("node-b", node_b)):
        out = controller.enroll(name, folder)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"enrolled {name}" in out.stdout
    cert = certificate(node_a)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node-a"
    assert cert.not_valid_after_utc.timestamp() - time.time() <= 3600 + 60  # short-lived
    key_mode = stat.S_IMODE((node_a / "node.key").stat().st_mode)
    assert key_mode == 0o600 and stat.S_IMODE(node_a.stat().st_mode) == 0o700

    assert controller.register(node_a, "node-a") == "OK"
    assert controller.register(node_b, "node-b") == "OK"
    # node A's certificate cannot speak as node B
    assert controller.register(node_a, "node-b") == "PERMISSION_DENIED"


def test_a_name_enrols_once_per_token(controller: Controller, tmp_path: Path) -> None:
    first = controller.enroll("node-a", tmp_path / "real-a")
    assert first.returncode == 0, first.stderr
    # another machine (its own new key) holding the bootstrap token claims node-a's name
    thief = controller.enroll("node-a", tmp_path / "thief")
    assert thief.returncode == 1
    assert "PERMISSION_DENIED" in thief.stderr and "nfctl certs approve node-a" in thief.stderr
    assert not (tmp_path / "thief" / "node.crt").exists()
    # nor with its own enrolled identity
    assert controller.enroll("node-b", tmp_path / "node-b").returncode == 0
    assert controller.enroll("node-a", tmp_path / "node-b", token=None).returncode == 1
    # wrong or missing token: nothing at all
    wrong = controller.enroll("node-c", tmp_path / "node-c", token="guess")
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
    none = controller.enroll("node-c", tmp_path / "node-c", token=None)
    assert none.returncode == 1 and "UNAUTHENTICATED" in none.stderr
    # a malformed name is refused before anything is signed
    bad = controller.enroll("Node_A\n", tmp_path / "bad")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr


def test_operator_approval_allows_one_reenrolment(controller: Controller, tmp_path: Path) -> None:
    old, new = tmp_path / "old-disk", tmp_path / "reinstalled"
    assert controller.enroll("node-a", old).returncode == 0
    never = nfctl("certs", "approve", "node-z", "--db", str(controller.db))
    assert never.returncode == 1 and "never enrolled" in never.stderr
    approve = nfctl("certs", "approve", "node-a", "--db", str(controller.db))
    assert approve.returncode == 0, approve.stderr
    out = controller.enroll("node-a", new)
    assert out.returncode == 0, out.stderr
    assert controller.register(new, "node-a") == "OK"
    # the approval was used up, and the old key no longer renews the name
    assert controller.enroll("node-a", tmp_path / "third").returncode == 1
    assert controller.enroll("node-a", old, token=None).returncode == 1


def test_renewal_with_own_key(controller: Controller, tmp_path: Path) -> None:
    folder = tmp_path / "node-a"
    assert controller.enroll("node-a", folder).returncode == 0
    key_before = (folder / "node.key").read_bytes()
    serial_before = certificate(folder).serial_number
    renewed = controller.enroll("node-a", folder, token=None)  # no token: the key proves it
    assert renewed.returncode == 0, renewed.stderr
    assert "renewed node-a" in renewed.stdout
    assert (folder / "node.key").read_bytes() == key_before  # the key never changes
    assert certificate(folder).serial_number != serial_before
    assert controller.register(folder, "node-a") == "OK"


def test_enrolment_verifies_the_controller(controller: Controller, tmp_path: Path) -> None:
    """The token is only sent to a controller whose certificate the CA vouches for."""
    other = tmp_path / "other-ca"
    assert nfctl("certs", "init", "--dir", str(other)).returncode == 0
    args = ["certs", "enroll", "--node", "node-a", "--controller", controller.enroll_address]
    (tmp_path / "t").write_text(TOKEN)
    out = nfctl(
        *args, "--tls-ca", str(other / "ca.crt"), "--dir", str(tmp_path / "a"),
        "--token-file", str(tmp_path / "t"),
    )  # fmt: skip
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr


def test_renewal_is_due_at_two_thirds_of_the_lifetime(tmp_path: Path) -> None:
    """The sidecar's schedule (`nfctl certs enroll --keep`), on a real signed certificate."""
    import datetime

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from nfctl.agent.enroll import renew_delay
    from nfctl.controller.certs import ensure_ca, sign_node_certificate

    ca_cert, ca_key = ensure_ca(tmp_path / "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = sign_node_certificate(
        ca_cert, ca_key, "node-a", key.public_key(), datetime.timedelta(hours=3)
    )
    path = tmp_path / "node.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    due = start + (end - start) * 2 / 3
    assert renew_delay(path, due - 100) == pytest.approx(100)
    assert renew_delay(path, due + 1) == 0
    assert renew_delay(tmp_path / "missing.crt", start) == 0


def test_enrolments_survive_a_controller_restart(tmp_path: Path) -> None:
    """Who owns a name is in the controller's SQLite: after a restart the token still
    cannot take an enrolled name, and the owner still renews."""
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "bootstrap").write_text(TOKEN)
    agent, enrol = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    ctl = Controller(tmp_path, pki, tmp_path / "controller.db", agent, enrol)
    args = [
        "--tls-ca-key", str(pki / "ca.key"),
        "--enroll-listen", enrol,
        "--enroll-token-file", str(tmp_path / "bootstrap"),
    ]  # fmt: skip
    with running_controller(tmp_path, pki, agent, *args):
        assert ctl.enroll("node-a", tmp_path / "a").returncode == 0
    with running_controller(tmp_path, pki, agent, *args):
        taken = ctl.enroll("node-a", tmp_path / "other")
        assert taken.returncode == 1 and "PERMISSION_DENIED" in taken.stderr
        renewed = ctl.enroll("node-a", tmp_path / "a", token=None)
        assert renewed.returncode == 0 and "renewed node-a" in renewed.stdout
