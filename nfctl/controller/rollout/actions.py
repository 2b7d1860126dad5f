"""Decisions outside the wave loop, pure like decide.py: starting a rollout for a new head,
and the operator actions (pause, resume, promote, abort)."""

from __future__ import annotations

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.rollout.decide import Decision, Inputs, Step, run
from nfctl.controller.rollout.gitrepo import PolicyAt
from nfctl.controller.rollout.plan import select_waves
from nfctl.controller.rollout.state import ACTIVE, Detail, RolloutError

ACTIONS = ("pause", "resume", "promote", "abort")


def should_start(head: str, recent: list[pb.Rollout]) -> bool:
    """Whether `head` gets a rollout now: not while one is active (a newer commit is
    queued until it ends; only the newest then starts), and never a second time (a
    revision rolled back or aborted is not rolled out again by itself)."""
    if not head or any(r.state in ACTIVE for r in recent):
        return False
    return not any(r.revision == head for r in recent)


def start(
    head: str,
    previous: str,
    in_force: PolicyAt,
    policy_revision: str,
    at_head: PolicyAt,
    rollout_id: str,
    inputs: Inputs,
) -> Decision | None:
    """The rollout of `head` (previous: the last completed revision; in force: its policy,
    read from `policy_revision`), its first step taken; None when no policy governs the
    fleet (every agent follows its ref). `inputs.policy` is `in_force.policy`."""
    now = inputs.now
    rollout = pb.Rollout(
        id=rollout_id, revision=head, previous_revision=previous, started_at=now, updated_at=now
    )
    policy = in_force.policy
    if policy is None and not previous and not at_head.present:
        return None

    def body(step: Step) -> None:
        step.decision.changed = True
        rollout, detail = step.rollout, step.detail
        if at_head.diagnostics:
            where = "; ".join(str(d) for d in at_head.diagnostics[:5])
            step.event(
                "Warning", "PolicyRefused",
                f"the RolloutPolicy of {head[:12]} is refused ({where}); it will not be in "
                "force after this revision completes: the last good policy stays",
            )  # fmt: skip
        if policy is None:
            # the first policy, or a fleet whose policy was removed: every node at once
            rollout.state = "Completed"
            rollout.message = (
                "no policy in force: every node approved at once"
                if previous
                else "first RolloutPolicy: every node approved at once"
            )
            rollout.policy = f"{at_head.file}@{head[:12]}" if at_head.present else ""
            step.approve_all(head, "no policy in force")
            step.event("Normal", "RolloutCompleted", rollout.message)
            return
        connected = [v for v in inputs.fleet.views().values() if v.connected]
        rollout.state = "Progressing"
        rollout.on_failure = policy.spec.on_failure.value
        rollout.policy = f"{in_force.file}:{policy.metadata.name}@{policy_revision[:12]}"
        detail.policy_revision = policy_revision
        for index, (name, nodes) in enumerate(select_waves(policy, connected)):
            rollout.waves.add(index=index, name=name, nodes=nodes, state="Pending")
        rollout.message = f"{len(rollout.waves)} waves over {len(connected)} nodes"
        detail.rollout_start = step.figures()
        step.event(
            "Normal", "RolloutStarted",
            f"rolling out {head[:12]} (previous {previous[:12]}) under {rollout.policy}: "
            + ", ".join(f"{w.name} ({len(w.nodes)} nodes)" for w in rollout.waves),
        )  # fmt: skip
        step.drive()

    return run(rollout, Detail(), inputs, body)


def act(
    action: str, reason: str, rollout: pb.Rollout, detail: Detail, inputs: Inputs, drive: bool
) -> Decision:
    """An operator's action on the rollout (RolloutError when it does not apply); with
    `drive` (on the leader) a rollout that goes on takes its next step at once."""

    def body(step: Step) -> None:
        step.decision.changed = True
        rollout, detail, now = step.rollout, step.detail, step.now
        why = f" by an operator{f': {reason}' if reason else ''}"
        if rollout.state not in ACTIVE:
            raise RolloutError(f"rollout {rollout.id} is {rollout.state}: nothing to {action}")
        wave = rollout.waves[rollout.current_wave] if rollout.waves else None
        if action == "pause":
            if rollout.state != "Progressing":
                raise RolloutError(f"rollout {rollout.id} is {rollout.state}, not Progressing")
            rollout.state, rollout.message = "Paused", f"paused{why}"
        elif action == "resume":
            if rollout.state == "Progressing":
                raise RolloutError(f"rollout {rollout.id} is already Progressing")
            if rollout.state == "Halted" and wave is not None:
                # judge the wave again from now on: a fresh bake
                detail.bake_start = step.figures()
                wave.state, wave.finished_at = "Baking", 0.0
                detail.bake_started, detail.last_eval = now, 0.0
                del wave.gates[:]
            rollout.state, rollout.message = "Progressing", f"resumed{why}"
        elif action == "promote":
            if wave is not None:
                wave.state, wave.finished_at = "Passed", now
                rollout.current_wave += 1
            rollout.state, rollout.message = "Progressing", f"wave promoted{why}"
        elif action == "abort":
            step.roll_back(f"aborted{why}")
            rollout.state, rollout.message = "Aborted", f"aborted{why}"
        else:
            raise RolloutError(f"unknown action {action!r}")
        step.event(
            "Warning" if action == "abort" else "Normal",
            f"Rollout{action.capitalize()}",
            f"{action}{why} (wave {rollout.current_wave + 1}/{len(rollout.waves)})",
        )
        if rollout.state == "Progressing" and drive:
            step.drive()

    return run(rollout, detail, inputs, body)
