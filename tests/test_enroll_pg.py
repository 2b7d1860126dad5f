"""Node enrolment on PostgreSQL shared by two controller replicas: a real PostgreSQL
(tests/pg_harness.py), two real `nfctl controller` processes each with its enrolment
listener, the real `nfctl certs enroll` / `nfctl certs approve` commands, and raw mTLS
clients registering on the agent listeners with the certificates enrolment produced.

A node enrolled through one replica renews through the other, cannot be taken over on
either, and an operator's approval is used by exactly one enrolment whichever replica the
requests reach, also when they race."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from nfctl.controller.certs import key_fingerprint
from nfctl.controller.enrollments_pg import PgEnrollmentStore
from nfctl.controller.pg_schema import LATEST
from nfctl.controller.store_pg import PgStore
from tests.ha_harness import Replica, free_port
from tests.loopback_controller import make_pki, nfctl
from tests.pg_harness import PgServer, pg_url, postgres  # noqa: F401
from tests.test_enrollment import TOKEN, Controller


@dataclass
class EnrollingReplica:
    replica: Replica
    client: Controller  # enrol/register against this replica's two listeners


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[list[EnrollingReplica]]:  # noqa: F811
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "bootstrap").write_text(TOKEN + "\n")
    started: list[EnrollingReplica] = []
    try:
        for name in ("ea", "eb"):
            enrol = f"127.0.0.1:{free_port()}"
            replica = Replica(
                name, pg_url, pki, tmp_path,
                "--tls-ca-key", str(pki / "ca.key"),
                "--enroll-listen", enrol,
                "--enroll-token-file", str(tmp_path / "bootstrap"),
                "--enroll-cert-hours", "1",
            ).start()  # fmt: skip
            client = Controller(tmp_path, pki, tmp_path / "unused.db", replica.address, enrol)
            started.append(EnrollingReplica(replica, client))
        yield started
    finally:
        for r in started:
            r.replica.stop()


def serial(folder: Path) -> int:
    return x509.load_pem_x509_certificate((folder / "node.crt").read_bytes()).serial_number


def issued_by(url: str, node: str) -> tuple[str, str]:
    """(serial, replica) of the node's current certificate, as the shared store has it."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT serial, replica FROM enrollments WHERE node = %s", (node,)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def test_enrol_on_one_replica_renew_on_the_other(
    replicas: list[EnrollingReplica],
    pg_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, b = replicas
    folder = tmp_path / "node-a"
    first = a.client.enroll("node-a", folder)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "enrolled node-a" in first.stdout
    assert issued_by(pg_url, "node-a") == (format(serial(folder), "x"), "ea")
    # the identity is good on every replica's agent listener (one CA)
    assert b.client.register(folder, "node-a") == "OK"
    assert b.client.register(folder, "node-b") == "PERMISSION_DENIED"

    # B knows node-a's key from the shared store: renewal without a token
    before = serial(folder)
    renewed = b.client.enroll("node-a", folder, token=None)
    assert renewed.returncode == 0, renewed.stdout + renewed.stderr
    assert "renewed node-a" in renewed.stdout
    assert serial(folder) != before
    assert issued_by(pg_url, "node-a") == (format(serial(folder), "x"), "eb")
    assert a.client.register(folder, "node-a") == "OK"

    # and B refuses another key for the name A enrolled, token or not
    thief = b.client.enroll("node-a", tmp_path / "thief")
    assert thief.returncode == 1
    assert "PERMISSION_DENIED" in thief.stderr and "nfctl certs approve node-a" in thief.stderr
    assert not (tmp_path / "thief" / "node.crt").exists()
    wrong = b.client.enroll("node-c", tmp_path / "node-c", token="guess")
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr


def test_one_approval_is_used_once_across_replicas(
    replicas: list[EnrollingReplica],
    pg_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    a, b = replicas
    old = tmp_path / "old-disk"
    assert a.client.enroll("node-r", old).returncode == 0
    never = nfctl("certs", "approve", "node-z", "--db", pg_url)
    assert never.returncode == 1 and "never enrolled" in never.stderr
    approve = nfctl("certs", "approve", "node-r", "--db", pg_url, "--by", "alice")
    assert approve.returncode == 0, approve.stdout + approve.stderr

    # two reinstalled machines claim the name at once, one through each replica
    folders = {"ea": tmp_path / "new-via-a", "eb": tmp_path / "new-via-b"}
    with ThreadPoolExecutor(2) as pool:
        results = dict(
            zip(
                folders,
                pool.map(
                    lambda pair: pair[0].client.enroll("node-r", pair[1]),
                    [(a, folders["ea"]), (b, folders["eb"])],
                ),
                strict=True,
            )
        )
    winners = [name for name, out in results.items() if out.returncode == 0]
    assert len(winners) == 1, {k: v.stdout + v.stderr for k, v in results.items()}
    [loser] = set(folders) - set(winners)
    assert "PERMISSION_DENIED" in results[loser].stderr
    assert not (folders[loser] / "node.crt").exists()
    winner_folder = folders[winners[0]]
    assert issued_by(pg_url, "node-r") == (format(serial(winner_folder), "x"), winners[0])

    # the approval is spent on both replicas; the old key no longer renews the name
    for r in (a, b):
        again = r.client.enroll("node-r", tmp_path / f"third-{r.replica.name}")
        assert again.returncode == 1 and "PERMISSION_DENIED" in again.stderr
        assert r.client.enroll("node-r", old, token=None).returncode == 1
        assert r.client.register(winner_folder, "node-r") == "OK"


def test_racing_claims_of_one_approval_win_once(pg_url: str) -> None:  # noqa: F811
    """Eight stores (eight connection pools, like eight replicas) claim one approval at
    the same instant with eight different keys: PostgreSQL's row lock lets exactly one
    through, and the name ends up with that one's key."""
    stores = [PgEnrollmentStore(pg_url, replica=f"r{i}") for i in range(8)]
    try:
        keys = [key_fingerprint(ec.generate_private_key(ec.SECP256R1()).public_key())]
        assert stores[0].claim("first", "node-x", keys[0], "1", time.time() + 3600)
        assert not stores[1].claim("first", "node-x", keys[0], "2", time.time() + 3600)
        assert stores[1].approve("node-x", "bob")
        current = stores[2].get("node-x")
        assert current is not None and current.reenrollment_approved
        assert current.approved_by == "bob"

        keys = [
            key_fingerprint(ec.generate_private_key(ec.SECP256R1()).public_key()) for _ in stores
        ]
        start = threading.Barrier(len(stores))

        def claim(i: int) -> bool:
            start.wait()
            return stores[i].claim("approved", "node-x", keys[i], f"s{i}", time.time() + 3600)

        with ThreadPoolExecutor(len(stores)) as pool:
            won = list(pool.map(claim, range(len(stores))))
        assert won.count(True) == 1, won
        after = stores[0].get("node-x")
        assert after is not None and not after.reenrollment_approved
        assert after.key_sha256 == keys[won.index(True)]
        assert after.serial == f"s{won.index(True)}"
    finally:
        for s in stores:
            s.close()


def test_enrolment_schema_is_its_own_migration(pg_url: str) -> None:  # noqa: F811
    """A database a fleet store created before enrolment moved to PostgreSQL (version 2)
    gains the enrollments table when a replica with enrolment starts; nodes are kept."""
    from nfctl.controller.pg_schema import MIGRATIONS

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, sql in MIGRATIONS:
            if version <= 2:
                conn.execute(sql)
                conn.execute("INSERT INTO schema_version VALUES (%s)", (version,))
        conn.execute(
            "INSERT INTO nodes (name, status, registered_at, last_seen) "
            "VALUES ('kept', ''::bytea, 1, 1)"
        )
    store = PgEnrollmentStore(pg_url)
    try:
        assert store.get("kept") is None
        assert store.claim("first", "kept", "k" * 64, "1", time.time() + 60)
    finally:
        store.close()
    fleet = PgStore(pg_url)
    try:
        assert fleet.version == LATEST >= 3
        assert [n.name for n in fleet.load_nodes()] == ["kept"]
    finally:
        fleet.close()


def test_approve_names_an_unreachable_database(tmp_path: Path) -> None:
    url = f"postgresql://postgres@/nfctl?host={tmp_path}/absent"
    out = nfctl("certs", "approve", "node-a", "--db", url)
    assert out.returncode == 1
    assert "cannot open the PostgreSQL store" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_pending_approval_is_kept_when_nothing_claims_it(pg_url: str) -> None:  # noqa: F811
    """A renewal with the current key does not use up an approval made for a new key."""
    store = PgEnrollmentStore(pg_url)
    try:
        assert store.claim("first", "node-k", "a" * 64, "1", time.time() + 3600)
        assert store.approve("node-k", "carol")
        assert store.claim("renewal", "node-k", "a" * 64, "2", time.time() + 3600)
        current = store.get("node-k")
        assert current is not None and current.reenrollment_approved
        assert current.serial == "2"
    finally:
        store.close()


def test_enrolment_while_postgresql_restarts(
    replicas: list[EnrollingReplica],
    postgres: PgServer,  # noqa: F811
    pg_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """With the database down an enrolment is refused as retryable (UNAVAILABLE, nothing
    issued); once it is back both replicas enrol again and the identities recorded before
    the restart still hold."""
    a, b = replicas
    kept = tmp_path / "kept"
    assert a.client.enroll("node-p", kept).returncode == 0
    postgres.stop()
    try:
        down = b.client.enroll("node-q", tmp_path / "during")
        assert down.returncode == 1
        assert "UNAVAILABLE" in down.stderr and "retry" in down.stderr
        assert not (tmp_path / "during" / "node.crt").exists()
    finally:
        postgres.start()
    back = b.client.enroll("node-q", tmp_path / "after")
    assert back.returncode == 0, back.stdout + back.stderr
    renewed = b.client.enroll("node-p", kept, token=None)
    assert renewed.returncode == 0 and "renewed node-p" in renewed.stdout
    thief = a.client.enroll("node-p", tmp_path / "thief")
    assert thief.returncode == 1 and "PERMISSION_DENIED" in thief.stderr
