"""What the rollout engine reads before it decides: rollouts from the store, revisions and
policies from the repository mirror, the fleet's statuses and verdict figures, and the
answers of promql gates from Prometheus. Reads only; writing is apply.py's job."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Iterable

import aiohttp

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.fleet import Fleet
from nfctl.controller.rollout.decide import FleetView
from nfctl.controller.rollout.gates import Outcome
from nfctl.controller.rollout.gitrepo import PolicyAt, RepoError, RepoMirror
from nfctl.controller.rollout.plan import verdict_figures
from nfctl.controller.rollout.promql import promql_gate
from nfctl.controller.rollout.state import ACTIVE, Detail, Snapshot
from nfctl.controller.storage import StoredRollout
from nfctl.manifest.rollout import PromQLGate

log = logging.getLogger(__name__)


class Observer:
    def __init__(
        self,
        fleet: Fleet,
        mirror: RepoMirror | None,
        prometheus_url: str | None,
        fetch_interval: float,
    ) -> None:
        self.fleet = fleet
        self.store = fleet.store
        self.mirror = mirror
        self.prometheus_url = prometheus_url
        self.fetch_interval = fetch_interval
        self.last_fetch = 0.0
        self._policies: dict[str, PolicyAt] = {}
        self._commits: dict[str, tuple[str, float]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._completed_cache: tuple[float, StoredRollout | None] = (0.0, None)
        self._detail_cache: tuple[str, str, Detail] | None = None  # (id, stored text, parsed)
        self.newest: StoredRollout | None = None  # as active() last read it

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    # -- store ------------------------------------------------------------------------------
    async def load(self, limit: int = 20, rollout_id: str = "") -> list[StoredRollout]:
        return await asyncio.to_thread(self.store.load_rollouts, limit, rollout_id)

    async def active(self) -> tuple[pb.Rollout, Detail] | None:
        recent = await self.load(5)
        self.newest = recent[0] if recent else None
        for stored in recent:
            if stored.rollout.state in ACTIVE:
                return stored.rollout, self.detail(stored)
        return None

    def detail(self, stored: StoredRollout) -> Detail:
        """The rollout's bookkeeping, parsed again only when the stored text changed: its
        snapshots hold every node's figures (megabytes of JSON at 10,000 nodes), and a
        step that changes nothing leaves it untouched."""
        cached = self._detail_cache
        if cached is not None and cached[0] == stored.rollout.id and cached[1] == stored.detail:
            return cached[2]
        detail = Detail.load(stored.detail)
        self._detail_cache = (stored.rollout.id, stored.detail, detail)
        return detail

    def saved(self, rollout_id: str, text: str, detail: Detail) -> None:
        """A step was stored: its detail is what the store now holds."""
        self._detail_cache = (rollout_id, text, detail)
        self._completed_cache = (0.0, None)

    async def last_completed(self, max_age: float = 0.0) -> StoredRollout | None:
        cached_at, cached = self._completed_cache
        if max_age and time.monotonic() - cached_at < max_age:
            return cached
        found = None
        for stored in await self.load(200):
            if stored.rollout.state == "Completed":
                found = stored
                break
        self._completed_cache = (time.monotonic(), found)
        return found

    # -- repository -------------------------------------------------------------------------
    async def head(self, now: float) -> str:
        if self.mirror is None:
            return ""
        if now - self.last_fetch >= self.fetch_interval:
            self.last_fetch = now
            try:
                return await asyncio.to_thread(self.mirror.fetch)
            except RepoError as exc:
                log.warning("rollout engine: %s", exc)
        return await asyncio.to_thread(self.mirror.head)

    async def policy_at(self, revision: str) -> PolicyAt:
        if revision not in self._policies:
            if self.mirror is None:
                return PolicyAt("", None)
            self._policies[revision] = await asyncio.to_thread(self.mirror.policy_at, revision)
        return self._policies[revision]

    async def commit_info(self, revision: str) -> tuple[str, float]:
        """(author, commit time) of a revision, ('', 0.0) when it cannot be read."""
        if revision not in self._commits and self.mirror is not None:
            try:
                info = await asyncio.to_thread(self.mirror.commit, revision)
                self._commits[revision] = (info.author, info.committed_at)
            except RepoError:
                return "", 0.0
        return self._commits.get(revision, ("", 0.0))

    async def policy_in_force(self) -> tuple[PolicyAt, str, str]:
        """(policy, last completed revision, revision the policy is read from): the
        policy of the last completed revision; when that revision's policy file was
        refused, the last good one before it. ('' revisions: none completed yet.)"""
        completed = [s.rollout for s in await self.load(200) if s.rollout.state == "Completed"]
        last = completed[0].revision if completed else ""
        for rollout in completed:
            at = await self.policy_at(rollout.revision)
            if not at.present or at.policy is not None:
                return at, last, rollout.revision
        return PolicyAt("", None), last, ""

    # -- fleet ------------------------------------------------------------------------------
    def fleet_view(self) -> FleetView:
        nodes = self.fleet.nodes
        return FleetView(
            statuses={name: entry.status for name, entry in nodes.items()},
            connected=frozenset(name for name, entry in nodes.items() if entry.connected),
        )

    async def figures(self, fleet: FleetView, nfs: Collection[str]) -> Snapshot:
        """Every node's verdict figures of the NFs the gates judge, read in a thread
        (statuses are replaced on report, never changed in place, so reading them there
        is safe): tens of milliseconds at 10,000 nodes the event loop does not wait for."""
        if not nfs:
            return {}
        statuses = list(fleet.statuses.items())

        def read() -> Snapshot:
            out: Snapshot = {}
            for name, status in statuses:
                figures = verdict_figures(status, nfs)
                if figures:
                    out[name] = figures
            return out

        return await asyncio.to_thread(read)

    async def promql(self, gates: Iterable[PromQLGate]) -> dict[PromQLGate, Outcome]:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return {gate: await promql_gate(gate, self.prometheus_url, self._http) for gate in gates}
