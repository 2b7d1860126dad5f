"""Node identities in PostgreSQL (storage.EnrollmentRecords), shared by every controller
replica: any replica enrols and renews, and an operator's approval recorded through one
replica is used up by exactly one enrolment on whichever replica it arrives at.

Each decision's condition is re-checked by the statement that records it: PostgreSQL
locks the row an UPDATE changes, and a concurrent UPDATE of the same row waits and then
re-evaluates its WHERE on the committed row, so of two enrolments racing for one approval
the second finds it spent (approved_at = 0) and changes nothing. Two first enrolments of a
new name race on the primary key instead."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from nfctl.controller.enrollments import Enrollment
from nfctl.controller.storage import StoreUnavailable
from nfctl.controller.store_pg import migrate, open_pool

COLUMNS = "node, key_sha256, serial, not_after, enrolled_at, renewed_at, approved_at, approved_by"


@contextmanager
def unavailable_on_error() -> Iterator[None]:
    """A database that is down or unreachable (including no pool connection within the
    timeout) as StoreUnavailable: the enrolment is refused as retryable."""
    try:
        yield
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"the PostgreSQL store did not answer: {exc}".strip()) from exc


class PgEnrollmentStore:
    def __init__(self, url: str, replica: str = "", timeout: float = 10.0) -> None:
        self.replica = replica
        # enrolment is a few calls per node per day: two connections are plenty
        self.pool = open_pool(url, timeout, max_size=2)
        with self.pool.connection() as conn:
            migrate(conn)

    def close(self) -> None:
        self.pool.close()

    def get(self, node: str) -> Enrollment | None:
        with unavailable_on_error(), self.pool.connection() as conn:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM enrollments WHERE node = %s", (node,)
            ).fetchone()
        return Enrollment(*row) if row else None

    def claim(self, kind: str, node: str, key_sha256: str, serial: str, not_after: float) -> bool:
        """As EnrollmentStore.claim: record an issued certificate only if the condition
        that allowed it still holds, whichever replica changed the row meanwhile."""
        now = time.time()
        if kind == "first":
            sql = (
                "INSERT INTO enrollments (node, key_sha256, serial, not_after, enrolled_at, "
                "renewed_at, replica) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (node) DO NOTHING"
            )
            params: tuple[object, ...] = (
                node, key_sha256, serial, not_after, now, now, self.replica,
            )  # fmt: skip
        elif kind == "approved":
            sql = (
                "UPDATE enrollments SET key_sha256 = %s, serial = %s, not_after = %s, "
                "enrolled_at = %s, renewed_at = %s, approved_at = 0, approved_by = '', "
                "replica = %s WHERE node = %s AND approved_at > 0"
            )
            params = (key_sha256, serial, not_after, now, now, self.replica, node)
        elif kind == "renewal":
            sql = (
                "UPDATE enrollments SET serial = %s, not_after = %s, renewed_at = %s, "
                "replica = %s WHERE node = %s AND key_sha256 = %s AND not_after > %s"
            )
            params = (serial, not_after, now, self.replica, node, key_sha256, now)
        else:
            raise ValueError(f"unknown enrolment kind {kind!r}")
        with unavailable_on_error(), self.pool.connection() as conn:
            return conn.execute(sql, params).rowcount > 0

    def approve(self, node: str, by: str) -> bool:
        with unavailable_on_error(), self.pool.connection() as conn:
            return (
                conn.execute(
                    "UPDATE enrollments SET approved_at = %s, approved_by = %s WHERE node = %s",
                    (time.time(), by, node),
                ).rowcount
                > 0
            )
