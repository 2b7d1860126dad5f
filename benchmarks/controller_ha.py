"""Controller HA under failure: 2 replicas on a real PostgreSQL (started here in a temp dir,
see tests/pg_harness.py), N simulated agents over real gRPC + mTLS split over both replicas.

Baseline (same run, everything healthy): a reconcile from one replica reaching every agent.
The simulated agents skip a command id they already executed, like the real agent.
Then the claim in its hardest honest form: a reconcile issued on the leader and the leader
killed with SIGKILL right after the call returned (the fan-out still in flight), events
sent just before the kill. Measured: leader failover, agents back on the surviving
replica, events lost or duplicated, commands lost or duplicated per agent, the fleet view
of the survivor, and a second fan-out after the failover.

    python -m benchmarks.controller_ha --agents 60 --json

Prints one JSON object. `waves_repeated` is null: rollouts (waves) do not exist yet."""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from tests.ha_harness import AgentPool, Replica, SimAgent, make_pki, wait_for
from tests.pg_harness import PgServer, _bin_dir


def connected(replica: Replica) -> set[str]:
    try:
        return {n["status"]["node"] for n in replica.operator("get", "nodes") if n["connected"]}
    except AssertionError:
        return set()


def fanout(pool: AgentPool, agents: list[SimAgent], replica: Replica, timeout: float) -> float:
    """Seconds from the reconcile call to the last agent holding the command (NaN if some
    never got it within timeout)."""
    before = {a.name: len(a.commands) for a in agents}
    start = time.time()
    replica.operator("reconcile", as_json=False)
    try:
        wait_for(lambda: all(len(a.commands) > before[a.name] for a in agents), timeout, "fan-out")
    except AssertionError:
        return float("nan")
    return max(a.commands[-1][1] for a in agents) - start


def pg_counters(url: str) -> tuple[int, int, int]:
    """(transactions committed, node rows written, event rows written) so far."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        tables: dict[str, int] = dict(
            conn.execute(
                "SELECT relname, n_tup_ins + n_tup_upd FROM pg_stat_user_tables "
                "WHERE relname IN ('nodes', 'events')"
            ).fetchall()
        )
    return int(row[0]) if row else 0, int(tables.get("nodes", 0)), int(tables.get("events", 0))


def steady_load(pool: AgentPool, agents: list[SimAgent], url: str, seconds: int) -> dict[str, Any]:
    """Worst case for the store: every agent reports a significant status change and one
    event every second (real agents do so only when something happens). Both replicas
    write; PostgreSQL's own counters say what it did."""
    time.sleep(1.5)  # statistics are sent to the collector with a delay
    before = pg_counters(url)
    start = time.monotonic()
    for tick in range(seconds):

        async def report(tick: int = tick) -> None:
            for a in agents:
                await a.send_status(f"steady-{tick}")
                await a.send_new_events(1, "Steady")

        pool.call(report)
        time.sleep(max(0.0, start + tick + 1 - time.monotonic()))
    elapsed = time.monotonic() - start
    time.sleep(1.5)
    after = pg_counters(url)
    with psycopg.connect(url) as conn:
        sizes = conn.execute(
            "SELECT pg_total_relation_size('nodes'), pg_total_relation_size('events'), "
            "(SELECT count(*) FROM events)"
        ).fetchone()
    assert sizes is not None
    per_1000 = 1000 / len(agents)
    return {
        "steady_seconds": round(elapsed, 1),
        "pg_commits_per_s": round((after[0] - before[0]) / elapsed, 1),
        "pg_node_rows_per_s_per_1000_agents": round((after[1] - before[1]) / elapsed * per_1000),
        "pg_event_rows_per_s_per_1000_agents": round((after[2] - before[2]) / elapsed * per_1000),
        "pg_nodes_table_bytes_per_1000_agents": round(sizes[0] * per_1000),
        "pg_events_table_bytes_per_event": round(sizes[1] / max(1, sizes[2])),
    }


def run(agents_n: int, tmp: Path) -> dict[str, Any]:
    bindir = _bin_dir()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    pg = PgServer(bindir).start()
    names = [f"ha-{i:05d}" for i in range(agents_n)]
    pki = make_pki(tmp / "pki", names)
    url = pg.create_database()
    replicas = [Replica(r, url, pki, tmp, "--stale-after", "30").start() for r in ("ra", "rb")]
    addresses = [r.address for r in replicas]
    agents = [SimAgent(n, addresses, pki, index=i % 2) for i, n in enumerate(names)]
    for a in agents:
        a.add_event("Applied")
    pool = AgentPool(agents)
    try:
        start = time.monotonic()
        wait_for(lambda: all(a.connected_to for a in agents), 120, "agents connected")
        connect_s = time.monotonic() - start
        wait_for(lambda: all(connected(r) == set(names) for r in replicas), 30, "fleet view")
        load = steady_load(pool, agents, url, seconds=10)
        leader = wait_for(
            lambda: [r for r in replicas if r.metric("nfctl_controller_leader") == 1.0],
            15,
            "leader",
        )[0]
        survivor = next(r for r in replicas if r is not leader)
        baseline_fanout = fanout(pool, agents, survivor, 10)
        cli_start = time.monotonic()  # part of every fan-out figure: the CLI's own start
        survivor.operator("get", "nodes")
        cli_call_s = time.monotonic() - cli_start

        async def burst() -> None:
            for a in agents:
                await a.send_new_events(2, "BeforeKill")

        pool.call(burst)
        on_leader = [a for a in agents if a.connected_to == leader.address]
        before = {a.name: len(a.commands) for a in agents}
        leader.operator("reconcile", as_json=False)
        killed = time.monotonic()
        leader.kill9()
        wait_for(lambda: survivor.metric("nfctl_controller_leader") == 1.0, 30, "failover")
        failover_s = time.monotonic() - killed
        wait_for(lambda: all(a.connected_to == survivor.address for a in agents), 60, "reconnect")
        reconnected_s = time.monotonic() - killed
        time.sleep(2)  # time for a late or duplicate command to show up
        got = {a.name: len(a.commands) - before[a.name] for a in agents}
        after_fanout = fanout(pool, agents, survivor, 10)

        wanted = {(a.name, s) for a in agents for s in range(1, a.sequence + 1)}
        stored: Counter[tuple[str, int]] = Counter()

        def complete() -> bool:
            # from the database: `nfctl events` returns at most 10,000
            stored.clear()
            with psycopg.connect(url) as conn:
                rows = conn.execute("SELECT node, sequence FROM events WHERE epoch = 'sim'")
                stored.update((str(node), int(seq)) for node, seq in rows)
            return set(stored) >= wanted

        with contextlib.suppress(AssertionError):  # counted below as lost
            wait_for(complete, 30, "events", every=1)
        duplicated_commands = sum(
            n - 1 for a in agents for n in Counter(cid for cid, _ in a.commands).values() if n > 1
        )
        return {
            "agents": agents_n,
            "replicas": len(replicas),
            "machine": f"{platform.node()} {platform.machine()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "connect_all_s": round(connect_s, 2),
            "cli_call_s": round(cli_call_s, 3),
            "baseline_fanout_s": round(baseline_fanout, 3),
            "leader_failover_s": round(failover_s, 2),
            "agents_reconnected_s": round(reconnected_s, 2),
            "agents_on_killed_leader": len(on_leader),
            "kill_fanout_delivered": sum(1 for n in got.values() if n >= 1),
            "kill_fanout_missed_on_killed_leader": sum(1 for a in on_leader if got[a.name] == 0),
            "kill_fanout_missed_on_survivor": sum(
                1 for a in agents if a not in on_leader and got[a.name] == 0
            ),
            "fanout_after_failover_s": round(after_fanout, 3),
            "events_sent": len(wanted),
            "events_lost": len(wanted - set(stored)),
            "events_duplicated": sum(n - 1 for n in stored.values()),
            "commands_duplicated": duplicated_commands,  # executed twice by an agent
            "commands_resent": sum(a.repeats for a in agents),  # sent again, not executed
            "waves_repeated": None,
            "fleet_view_complete": connected(survivor) == set(names),
            **load,
        }
    finally:
        pool.stop()
        for r in replicas:
            r.stop()
        pg.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=60, help="simulated agents")
    parser.add_argument("--json", action="store_true", help="JSON only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nfctl-ha-bench-") as tmp:
        result = run(args.agents, Path(tmp))
    print(json.dumps(result, indent=None if args.json else 2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
