"""SQLite table of node identities: which key holds each node name, until when, and whether
an operator approved one more enrolment of that name.

Its own table and connection on the controller's database file (WAL), so `nfctl certs
approve` can write while the controller runs, and the fleet store is left alone."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS enrollments (
    node TEXT PRIMARY KEY,
    key_sha256 TEXT NOT NULL,
    serial TEXT NOT NULL,
    not_after REAL NOT NULL,
    enrolled_at REAL NOT NULL,
    renewed_at REAL NOT NULL,
    approved_at REAL NOT NULL DEFAULT 0,
    approved_by TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class Enrollment:
    node: str
    key_sha256: str  # SHA-256 of the node's public key (SubjectPublicKeyInfo, DER)
    serial: str
    not_after: float
    enrolled_at: float
    renewed_at: float
    approved_at: float  # 0: no pending approval for another enrolment
    approved_by: str

    @property
    def reenrollment_approved(self) -> bool:
        return self.approved_at > 0


class EnrollmentStore:
    def __init__(self, path: Path) -> None:
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=10
        )
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, node: str) -> Enrollment | None:
        with self._lock:
            row = self._db.execute(
                "SELECT node, key_sha256, serial, not_after, enrolled_at, renewed_at, "
                "approved_at, approved_by FROM enrollments WHERE node = ?",
                (node,),
            ).fetchone()
        return Enrollment(*row) if row else None

    def claim(self, kind: str, node: str, key_sha256: str, serial: str, not_after: float) -> bool:
        """Record an issued certificate, atomically with the condition that allowed it, so
        two concurrent enrolments of one name cannot both win. kind: "first" (the name has
        no identity), "approved" (uses the operator's approval), "renewal" (same key)."""
        now = time.time()
        with self._lock:
            if kind == "first":
                try:
                    self._db.execute(
                        "INSERT INTO enrollments (node, key_sha256, serial, not_after, "
                        "enrolled_at, renewed_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (node, key_sha256, serial, not_after, now, now),
                    )
                except sqlite3.IntegrityError:
                    return False
                return True
            if kind == "approved":
                sql = (
                    "UPDATE enrollments SET key_sha256 = ?, serial = ?, not_after = ?, "
                    "enrolled_at = ?, renewed_at = ?, approved_at = 0, approved_by = '' "
                    "WHERE node = ? AND approved_at > 0"
                )
                params: tuple[object, ...] = (key_sha256, serial, not_after, now, now, node)
            elif kind == "renewal":
                sql = (
                    "UPDATE enrollments SET serial = ?, not_after = ?, renewed_at = ? "
                    "WHERE node = ? AND key_sha256 = ? AND not_after > ?"
                )
                params = (serial, not_after, now, node, key_sha256, now)
            else:
                raise ValueError(f"unknown enrolment kind {kind!r}")
            return self._db.execute(sql, params).rowcount > 0

    def approve(self, node: str, by: str) -> bool:
        """Allow one more enrolment of `node` (e.g. the node was reinstalled and lost its
        key). False when the name never enrolled: its first enrolment needs no approval."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE enrollments SET approved_at = ?, approved_by = ? WHERE node = ?",
                (time.time(), by, node),
            )
        return cursor.rowcount > 0
