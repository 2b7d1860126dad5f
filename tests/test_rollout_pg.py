"""The rollout engine on PostgreSQL: a controller restarted mid-rollout resumes from the
persisted state (the new replica wins the leader lock) without repeating a wave or an
approval."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.pg_harness import PgServer, pg_url, postgres  # noqa: F401
from tests.test_rollout_operations import restart_mid_rollout


def test_a_restarted_controller_on_postgresql_resumes_the_rollout(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    asyncio.run(restart_mid_rollout(tmp_path, pg_url))
