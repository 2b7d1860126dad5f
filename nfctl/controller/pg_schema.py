"""The PostgreSQL schema, as numbered migrations applied in order at start-up. The
schema_version table holds the number of the last one applied; a migration and its
version row commit together, and an advisory lock keeps two replicas starting at once
from applying the same one twice. Append new migrations; never edit one that shipped."""

from __future__ import annotations

from nfctl.controller.pg_schema_rollout import ROLLOUT_MIGRATION

MIGRATION_LOCK = 0x6E66_6374_6C00  # "nfctl\0": pg_advisory_xact_lock key for migrations

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE nodes (
            name TEXT PRIMARY KEY,
            status BYTEA NOT NULL,
            registered_at DOUBLE PRECISION NOT NULL,
            last_seen DOUBLE PRECISION NOT NULL,
            features TEXT NOT NULL DEFAULT '[]',
            epoch TEXT NOT NULL DEFAULT '',
            acked BIGINT NOT NULL DEFAULT 0
        );
        CREATE TABLE events (
            id BIGSERIAL PRIMARY KEY,
            node TEXT NOT NULL,
            epoch TEXT NOT NULL DEFAULT '',
            sequence BIGINT NOT NULL,
            time DOUBLE PRECISION NOT NULL,
            type TEXT NOT NULL,
            reason TEXT NOT NULL,
            nf TEXT NOT NULL DEFAULT '',
            revision TEXT NOT NULL DEFAULT '',
            author TEXT NOT NULL DEFAULT '',
            commit_time DOUBLE PRECISION NOT NULL DEFAULT 0,
            message TEXT NOT NULL,
            UNIQUE (node, epoch, sequence)
        );
        CREATE INDEX events_time ON events (time);
        CREATE INDEX events_nf ON events (nf, time);
        CREATE INDEX events_revision ON events (revision text_pattern_ops);
        """,
    ),
    (
        # Several replicas: which one holds a node's stream, and the transaction that
        # last wrote each row, so a replica reads only rows changed since its last look
        # (by transaction id rather than a sequence: a sequence number is taken before
        # its transaction commits, and a reader past it would miss that row for good).
        2,
        """
        ALTER TABLE nodes ADD COLUMN holder TEXT NOT NULL DEFAULT '';
        ALTER TABLE nodes ADD COLUMN change XID8 NOT NULL DEFAULT pg_current_xact_id();
        CREATE INDEX nodes_change ON nodes (change);
        CREATE TABLE commands (
            id BIGSERIAL PRIMARY KEY,
            command_id TEXT NOT NULL UNIQUE,
            body BYTEA NOT NULL,
            nodes TEXT[] NOT NULL,
            origin TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE deliveries (
            command_id TEXT NOT NULL,
            node TEXT NOT NULL,
            replica TEXT NOT NULL,
            done BOOLEAN NOT NULL DEFAULT false,  -- the agent answered (CommandResult)
            PRIMARY KEY (command_id, node)
        );
        """,
    ),
    (3, ROLLOUT_MIGRATION),  # rollouts and approvals (issue #12)
]

LATEST = MIGRATIONS[-1][0]
