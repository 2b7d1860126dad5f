"""The rollout engine's tables (PostgreSQL), a migration of their own: the rollouts with
their persisted state and the approval each node holds."""

from __future__ import annotations

ROLLOUT_MIGRATION = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    started_at DOUBLE PRECISION NOT NULL,
    body BYTEA NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS rollouts_started ON rollouts (started_at);
CREATE TABLE IF NOT EXISTS approvals (
    node TEXT PRIMARY KEY,
    revision TEXT NOT NULL,
    rollout_id TEXT NOT NULL,
    wave INTEGER NOT NULL,
    reason TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL
);
"""
