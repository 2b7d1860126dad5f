"""Rollout state in both stores: a step and its approvals are written together, and only
over the state they were computed from (a concurrent writer's step is refused whole)."""

from __future__ import annotations

from pathlib import Path

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.storage import Store, StoredApproval, open_store
from tests.pg_harness import PgServer, pg_url, postgres  # noqa: F401


def exercise(store: Store) -> None:
    rollout = pb.Rollout(id="r1", revision="b" * 40, state="Progressing", started_at=1.0)
    rollout.updated_at = 1.0
    first = [StoredApproval("n1", "b" * 40, "r1", 0, "wave 1 of 2 (canary)", 1.0)]
    assert store.save_rollout(rollout, '{"events": 1}', first, None)
    assert not store.save_rollout(rollout, "{}", [], None)  # the same rollout twice
    leader = pb.Rollout()
    leader.CopyFrom(rollout)
    operator = pb.Rollout()
    operator.CopyFrom(rollout)
    operator.state, operator.updated_at = "Paused", 2.0
    assert store.save_rollout(operator, "{}", [], expected=1.0)
    # the leader computed its next step from the state before the pause: refused whole
    leader.current_wave, leader.updated_at = 1, 3.0
    second = [StoredApproval("n2", "b" * 40, "r1", 1, "wave 2 of 2 (rest)", 3.0)]
    assert not store.save_rollout(leader, "{}", second, expected=1.0)
    [stored] = store.load_rollouts(5)
    assert stored.rollout.state == "Paused" and stored.rollout.current_wave == 0
    assert [(a.node, a.wave) for a in store.load_approvals()] == [("n1", 0)]
    assert store.load_approvals("n2") == []
    newer = pb.Rollout(id="r2", revision="c" * 40, state="Completed", started_at=5.0)
    assert store.save_rollout(newer, "{}", [], None)
    assert [s.rollout.id for s in store.load_rollouts(5)] == ["r2", "r1"]
    assert store.load_rollouts(5, "r1")[0].detail == "{}"


def test_sqlite_store(tmp_path: Path) -> None:
    store = open_store(tmp_path / "controller.db")
    try:
        exercise(store)
    finally:
        store.close()


def test_postgresql_store(pg_url: str) -> None:  # noqa: F811
    store = open_store(pg_url, replica="a")
    try:
        exercise(store)
    finally:
        store.close()


def test_approval_rows_convert_to_the_wire_message() -> None:
    row = StoredApproval("n1", "a" * 40, "r1", 2, "rollback: gate x failed", 9.0)
    assert row.to_proto() == pb.ApproveRevision(
        revision="a" * 40, rollout_id="r1", wave=2, reason="rollback: gate x failed"
    )
