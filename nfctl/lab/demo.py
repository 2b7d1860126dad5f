"""`nfctl lab demo`: the GitOps story on a live multi-node lab, checked at every step.

1. deploy the NF library on every node      4. a broken commit is refused, last good kept
2. block a source with a commit (live)      5. `git revert` restores
3. new program version under traffic        6. a commit whose tests fail is refused
                                            7. a harmful commit stops at the canary and
                                               rolls back; a good one completes all waves
                                            8. fleet status from the controller
Exit 0 only if every step behaved."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.lab.lab import Lab, LabError
from nfctl.netns import ping_summary

FINISHED = ("Completed", "RolledBack", "Halted", "Aborted")
RATE_GOOD = "rate_pps: 20000, burst: 40000"
RATE_HARMFUL = "rate_pps: 20, burst: 40"  # "20k" written as 20: pps, not kpps
RATE_FIXED = "rate_pps: 30000, burst: 60000"


def rollout_policy(nodes: int) -> str:
    """The lab's RolloutPolicy: the canary first, judged on the ratelimit's drop ratio
    against the nodes not yet updated, on readiness, and on a PromQL query against the
    lab's Prometheus (every agent scraped)."""
    return f"""apiVersion: nfctl.io/v1alpha1
kind: RolloutPolicy
metadata:
  name: lab
spec:
  onFailure: rollback
  progressDeadline: 60s
  interval: 0.5s
  waves:
    - name: canary
      selector: {{role: canary}}
      bake: 4s
    - name: rest
      bake: 2s
  gates:
    - kind: ready
    - kind: verdict
      nf: ratelimit
      maxIncrease: 0.05
    - kind: promql
      name: agents-scraped
      query: 'count(up{{job="nfctl-agent"}} == 1)'
      min: {nodes}
"""


@dataclass
class StepResult:
    title: str
    ok: bool
    detail: str
    seconds: float


class Demo:
    """The steps of `nfctl lab demo`, each run against a live lab and checked; the verdict
    is whether every step behaved."""

    def __init__(self, lab: Lab, console: Console) -> None:
        self.lab = lab
        self.console = console
        self.results: list[StepResult] = []

    def say(self, text: str) -> None:
        self.console.print(f"   {text}")

    def step(self, number: int, title: str, body: Callable[[], str]) -> bool:
        self.console.print()
        self.console.rule(f"[bold]{number}. {title}")
        start = time.monotonic()
        try:
            detail = body()
            ok = True
        except (AssertionError, LabError) as exc:
            detail = str(exc)
            ok = False
        seconds = time.monotonic() - start
        self.results.append(StepResult(title, ok, detail, seconds))
        mark = "[green]PASS[/green]" if ok else "[red]FAIL[/red]"
        self.console.print(f"   {mark} {escape(detail)}")
        return ok

    # -- steps ---------------------------------------------------------------------------
    def deploy(self) -> str:
        lab = self.lab
        assert lab.topo is not None
        names = [n.name for n in lab.topo.nodes]
        fns = {f.name: f for f in lab.functions()}
        for name in ("blocklist", "ratelimit", "counter", "dscp"):
            fn = fns.get(name)
            assert fn is not None, f"{name} is not reported by the fleet"
            states = {s: n for v in fn.versions for s, n in v.states.items()}
            assert states == {"Applied": len(names)}, f"{name}: {states}"
        self.say("XDP chain on every node's eth0: blocklist (prio 100) -> ratelimit (prio 200)")
        self.say("TC: counter on ingress, dscp marker on egress")
        for src, dst in ((names[1], names[0]), (names[-1], names[0])):
            got = lab.ping(src, dst, 3)
            assert got == 3, f"{src} -> {dst}: {got}/3 replies before any block"
        self.say(f"traffic flows: {names[1]} -> {names[0]} and {names[-1]} -> {names[0]} 3/3")
        return f"4 NFs applied on {len(names)} nodes, revision {self.head()[:12]}"

    def block(self) -> str:
        lab = self.lab
        assert lab.topo is not None
        victim, target, friend = lab.topo.nodes[-1], lab.topo.nodes[0], lab.topo.nodes[1]
        before = lab.program_ids("blocklist")
        lab.edit(
            "nfs/blocklist/nf.yaml",
            lambda t: t.replace(
                "        - {key: 203.0.113.7, value: 1}",
                "        - {key: 203.0.113.7, value: 1}\n"
                f"        - {{key: {victim.ip}, value: 1}}",
            ),
        )
        sha = lab.commit(f"Block {victim.name} ({victim.ip}): suspicious traffic")
        self.say(
            f"commit {sha[:12]} pushed: blocked_v4 += {victim.ip}; "
            "the push webhook wakes every agent"
        )
        seconds = lab.wait_applied(sha)
        self.say(f"all nodes applied it {seconds:.2f}s after the push")
        blocked = lab.ping(victim.name, target.name, 3, timeout=0.3)
        allowed = lab.ping(friend.name, target.name, 3)
        assert blocked == 0, f"{victim.name} -> {target.name}: {blocked}/3 got through"
        assert allowed == 3, f"{friend.name} -> {target.name}: {allowed}/3"
        self.say(
            f"{victim.name} -> {target.name}: 0/3 (dropped at XDP); "
            f"{friend.name} -> {target.name}: 3/3"
        )
        after = lab.program_ids("blocklist")
        assert after == before, f"program ids changed: {before} -> {after}"
        self.say(
            f"program ids unchanged ({', '.join(f'{k}:{v}' for k, v in sorted(after.items()))}): "
            "map updated in place"
        )
        return f"entry enforced {seconds:.2f}s after push, no reload"

    def upgrade(self) -> str:
        lab = self.lab
        assert lab.topo is not None
        target, friend, victim = lab.topo.nodes[0], lab.topo.nodes[1], lab.topo.nodes[-1]
        before = lab.program_ids("blocklist")
        flood = lab.flood(friend.name, target.name, count=6000, interval=0.001)
        time.sleep(0.5)
        lab.edit(
            "nfs/blocklist/blocklist.c",
            lambda t: t.replace(
                "#ifndef MAX_RULES", "/* 1.1.0: counts drops per family */\n#ifndef MAX_RULES"
            ),
        )
        lab.edit("nfs/blocklist/nf.yaml", lambda t: t.replace("version: 1.0.0", "version: 1.1.0"))
        sha = lab.commit("blocklist 1.1.0")
        self.say(
            f"commit {sha[:12]}: blocklist 1.1.0 (new program) while {friend.name} pings "
            f"{target.name} every 1 ms"
        )
        seconds = lab.wait_applied(sha)
        self.say(f"every node compiled, verified and swapped it in {seconds:.2f}s")
        out, _ = flood.communicate(timeout=120)
        try:
            sent, received = ping_summary(out)
        except ValueError as exc:
            raise AssertionError(str(exc)) from None  # a failed step, not a crashed demo
        after = lab.program_ids("blocklist")
        assert all(after[n] != before[n] for n in after), (
            f"program not replaced: {before} -> {after}"
        )
        self.say(
            f"traffic during the upgrade: {sent} sent, {received} received, {sent - received} lost"
        )
        assert sent == received, f"{sent - received} packets lost during the upgrade"
        assert lab.ping(victim.name, target.name, 2, timeout=0.3) == 0, "block lost across versions"
        self.say(
            f"{victim.name} still blocked: the pinned blocklist map carried over to the new version"
        )
        return f"new version live on all nodes, {sent} packets, 0 lost"

    def broken(self) -> str:
        lab = self.lab
        assert lab.topo is not None
        target, friend, victim = lab.topo.nodes[0], lab.topo.nodes[1], lab.topo.nodes[-1]
        good = self.head()
        before = lab.program_ids("blocklist")
        lab.edit(
            "nfs/blocklist/blocklist.c",
            lambda t: t.replace("return XDP_PASS;\n}", "return XDP_PASS\n}"),
        )
        sha = lab.commit("blocklist: refactor (oops)")
        self.say(f"commit {sha[:12]} has a C syntax error")
        lab.wait_attempted(sha)
        fn = self.wait_failing("blocklist")
        assert fn.failing, "the failure is not reported"
        failure = fn.failing[0]
        where = (
            f"{failure.error.file}:{failure.error.line}"
            if failure.error.line
            else failure.error.file
        )
        self.say(
            f"controller: blocklist failing on {len(fn.failing)} node(s): "
            f"{where}: {failure.error.message}"
        )
        assert "blocklist.c" in where and failure.error.line > 0
        for node in lab.nodes():
            assert node.status.last_applied_revision == good, (
                f"{node.status.node} moved off {good[:12]}"
            )
        assert lab.program_ids("blocklist") == before, "the running version changed"
        assert lab.ping(victim.name, target.name, 2, timeout=0.3) == 0
        assert lab.ping(friend.name, target.name, 2) == 2
        self.say(f"last good version {good[:12]} keeps running everywhere (block still enforced)")
        return f"refused with {where}; nothing detached"

    def revert(self) -> str:
        lab = self.lab
        before = lab.program_ids("blocklist")
        sha = lab.revert_last()
        self.say(f"git revert -> {sha[:12]}")
        seconds = lab.wait_applied(sha)
        fn = next(f for f in lab.functions() if f.name == "blocklist")
        assert not fn.failing, "still failing after the revert"
        assert lab.program_ids("blocklist") == before, (
            "the good build should be adopted, not rebuilt"
        )
        return (
            f"all nodes Ready at the revert in {seconds:.2f}s "
            "(same program: adopted, not recompiled)"
        )

    def tests_gate(self) -> str:
        """A version that compiles and verifies but breaks its own tests.yaml never goes
        live: every agent runs the NF's packet tests before the swap."""
        lab = self.lab
        assert lab.topo is not None
        target, victim = lab.topo.nodes[0], lab.topo.nodes[-1]
        good = self.head()
        before = lab.program_ids("blocklist")
        lab.edit(
            "nfs/blocklist/blocklist.c",
            lambda t: t.replace("return count_drop(0);", "return XDP_PASS; /* faster? */"),
        )
        sha = lab.commit("blocklist: skip the IPv4 drop path (compiles, verifies)")
        self.say(f"commit {sha[:12]}: IPv4 sources are no longer dropped; it compiles fine")
        lab.wait_attempted(sha)
        fn = self.wait_failing("blocklist")
        assert fn.failing, "the test failure is not reported"
        error = fn.failing[0].error
        where = f"{error.file}:{error.line}"
        self.say(f"controller: blocklist failing on {len(fn.failing)} node(s): {where}")
        self.say(f"  {error.message}")
        assert error.file.endswith("blocklist/tests.yaml") and error.line > 0, where
        assert error.message.startswith("test '"), error.message
        for node in lab.nodes():
            assert node.status.last_applied_revision == good, (
                f"{node.status.node} moved off {good[:12]}"
            )
        assert lab.program_ids("blocklist") == before, "the running version changed"
        assert lab.ping(victim.name, target.name, 2, timeout=0.3) == 0, "block lost"
        self.say(f"{victim.name} still blocked: the tested version keeps running")
        restored = lab.revert_last()
        seconds = lab.wait_applied(restored)
        self.say(f"git revert -> {restored[:12]}, applied in {seconds:.2f}s")
        return f"refused by its tests at {where}; nothing swapped"

    def rollout(self) -> str:
        """A harmful-but-valid commit (verifier-clean; drops most legitimate traffic) is
        stopped after the canary wave and rolled back by itself; the rest of the fleet
        never runs it. Then a good commit completes every wave."""
        lab = self.lab
        assert lab.topo is not None
        names = [n.name for n in lab.topo.nodes]
        canary = [n for n in names if lab.role(n) == "canary"]
        (lab.paths.work / "nfs" / "rollout.yaml").write_text(rollout_policy(len(names)))
        good = lab.commit("Roll out wave by wave: the canary first, gated on the datapath")
        first = self.wait_rollout(good, 120)
        assert first.state == "Completed", f"first policy: {first.state} {first.message}"
        lab.wait_applied(good)
        self.say(f"commit {good[:12]} adds nfs/rollout.yaml: {first.message}")
        # steady legitimate traffic through every node: node i+1 pings node i, 100/s
        floods = [
            lab.flood(names[(i + 1) % len(names)], names[i], count=30000, interval=0.01)
            for i in range(len(names))
        ]
        try:
            time.sleep(3)  # counters for a baseline
            lab.edit("nfs/ratelimit/nf.yaml", lambda t: t.replace(RATE_GOOD, RATE_HARMFUL))
            bad = lab.commit("ratelimit: 20k per source")
            self.say(
                f"commit {bad[:12]}: ratelimit {RATE_HARMFUL} (meant 20k): compiles, verifies, "
                "and drops most legitimate traffic"
            )
            done = self.wait_rollout(bad, 120)
            assert done.state == "RolledBack", f"{done.state}: {done.message}"
            wave = done.waves[0]
            assert list(wave.nodes) == canary, f"canary wave: {list(wave.nodes)}"
            failed = [g for g in wave.gates if not g.ok]
            assert failed, "no gate failed"
            for gate in failed:
                self.say(f"gate {gate.name or gate.kind} failed on {wave.name}: {gate.message}")
            self.wait_nodes_on(good, 30)
            ran_bad = sorted(
                {
                    e.node
                    for e in self.history_of(bad)
                    if e.reason in ("Applied", "RevisionApproved")
                }
            )
            assert set(ran_bad) <= set(canary), f"nodes that ran {bad[:12]}: {ran_bad}"
            rest = [n for n in names if n not in canary]
            self.say(
                f"halted after the canary wave and rolled back: {', '.join(canary)} back on "
                f"{good[:12]}; {', '.join(rest)} never ran {bad[:12]}"
            )
            lab.edit("nfs/ratelimit/nf.yaml", lambda t: t.replace(RATE_HARMFUL, RATE_FIXED))
            fixed = lab.commit("ratelimit: 30k per source")
            done = self.wait_rollout(fixed, 180)
            assert done.state == "Completed", f"{done.state}: {done.message}"
            assert [w.state for w in done.waves] == ["Passed"] * len(done.waves), done.waves
            lab.wait_applied(fixed)
            took = done.updated_at - done.started_at
            self.say(
                f"commit {fixed[:12]}: {len(done.waves)} waves passed "
                f"({', '.join(f'{w.name}: {len(w.nodes)} node(s)' for w in done.waves)}) "
                f"in {took:.1f}s"
            )
        finally:
            for flood in floods:
                flood.terminate()
                flood.wait(timeout=10)
        return (
            f"harmful commit stopped on {len(canary)}/{len(names)} node(s) and rolled back; "
            f"good commit on every node in {len(done.waves)} waves"
        )

    def wait_rollout(self, revision: str, timeout: float) -> pb.Rollout:
        """The rollout of revision once it has finished (completed, rolled back, ...)."""
        deadline = time.monotonic() + timeout
        last: pb.Rollout | None = None
        while time.monotonic() < deadline:
            with self.lab.fleet() as stub:
                reply = stub.ListRollouts(pb.ListRolloutsRequest(limit=20), timeout=10)
            last = next((r for r in reply.rollouts if r.revision == revision), last)
            if last is not None and last.state in FINISHED:
                return last
            time.sleep(0.3)
        state = f"{last.state}: {last.message}" if last else "never started"
        raise LabError(f"rollout of {revision[:12]} not finished in {timeout:.0f}s ({state})")

    def wait_nodes_on(self, revision: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            applied = {n.status.node: n.status.last_applied_revision for n in self.lab.nodes()}
            if all(rev == revision for rev in applied.values()):
                return
            if time.monotonic() > deadline:
                raise LabError(f"not every node back on {revision[:12]}: {applied}")
            time.sleep(0.2)

    def history_of(self, revision: str) -> list[pb.Event]:
        with self.lab.fleet() as stub:
            request = pb.GetHistoryRequest(revision=revision, limit=1000)
            return list(stub.GetHistory(request, timeout=10).events)

    def fleet(self) -> str:
        lab = self.lab
        nodes = Table(title="nodes (from the controller)", header_style="bold")
        for column in ("node", "connected", "ready", "applied", "NFs"):
            nodes.add_column(column)
        for node in lab.nodes():
            st = node.status
            ready = next((c for c in st.conditions if c.type == "Ready"), None)
            nodes.add_row(
                st.node,
                "yes" if node.connected else "no",
                "True" if ready and ready.status else f"False {ready.reason if ready else ''}",
                st.last_applied_revision[:12],
                ", ".join(f"{f.name} {f.version}" for f in st.functions),
            )
        self.console.print(nodes)
        fns = Table(title="network functions across the fleet", header_style="bold")
        for column in ("NF", "nodes", "version", "revision", "states"):
            fns.add_column(column)
        for fn in lab.functions():
            for v in fn.versions:
                fns.add_row(
                    fn.name,
                    str(v.nodes),
                    v.version,
                    v.revision[:12],
                    ", ".join(f"{k}={n}" for k, n in v.states.items()),
                )
        self.console.print(fns)
        audit = Table(title="audit trail (latest events)", header_style="bold")
        for column in ("time", "node", "NF", "reason", "revision", "author", "message"):
            audit.add_column(column)
        for event in lab.history(limit=12):
            audit.add_row(
                time.strftime("%H:%M:%S", time.localtime(event.time)),
                event.node,
                event.nf,
                event.reason,
                event.revision[:12],
                event.author,
                escape(event.message[:70]),
            )
        self.console.print(audit)
        fleet = lab.nodes()
        ready_nodes = [
            n for n in fleet if any(c.type == "Ready" and c.status for c in n.status.conditions)
        ]
        assert len(ready_nodes) == len(fleet), "not every node is Ready"
        return f"{len(ready_nodes)}/{len(fleet)} nodes Ready"

    def wait_failing(self, name: str, timeout: float = 60) -> pb.FunctionSummary:
        """The NF as the fleet reports it once every node reports its failure: a status
        heartbeat sent during a pass can show the revision attempted before the failure."""
        assert self.lab.topo is not None
        deadline = time.monotonic() + timeout
        while True:
            fn = next(f for f in self.lab.functions() if f.name == name)
            if len(fn.failing) >= len(self.lab.topo.nodes) or time.monotonic() > deadline:
                return fn
            time.sleep(0.5)

    def head(self) -> str:
        from nfctl.lab.lab import _git

        return _git(self.lab.paths.work, "rev-parse", "HEAD")

    def run(self) -> bool:
        steps = [
            ("Deploy the NF library on every node", self.deploy),
            ("Block a source with a commit, enforced live", self.block),
            ("Roll out a new program version under traffic", self.upgrade),
            ("A broken commit is refused; the last good version stays", self.broken),
            ("git revert restores", self.revert),
            ("A commit whose packet tests fail is refused on every node", self.tests_gate),
            ("A harmful commit stops at the canary and rolls back by itself", self.rollout),
            ("Fleet status from the controller", self.fleet),
        ]
        for number, (title, body) in enumerate(steps, start=1):
            if not self.step(number, title, body):
                break
        summary = Table(title="nfctl lab demo", header_style="bold")
        for column in ("step", "result", "time", "detail"):
            summary.add_column(column)
        for number, result in enumerate(self.results, start=1):
            summary.add_row(
                f"{number}. {result.title}",
                "[green]PASS[/green]" if result.ok else "[red]FAIL[/red]",
                f"{result.seconds:.1f}s",
                escape(result.detail),
            )
        self.console.print()
        self.console.print(summary)
        ok = len(self.results) == len(steps) and all(r.ok for r in self.results)
        info = self.lab.describe() if self.lab.topo else {}
        if info:
            self.console.print(
                Panel(
                    f"nfctl get nodes {info['operator_flags']}\n"
                    f"NF repo (commit and push to main): {info['repo']}\n"
                    f"logs: {info['logs']}\n"
                    "remove everything: nfctl lab down",
                    title="the lab is still running; explore it",
                )
            )
        return ok
