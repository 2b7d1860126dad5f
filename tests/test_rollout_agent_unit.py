"""The agent's approval decision (pure) and the Git checks behind it (real repositories)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nfctl.agent.approval import (
    APPROVAL_REFUSED,
    APPROVED,
    AWAITING_APPROVAL,
    FOLLOWING_REF,
    Approval,
    ApprovalState,
    decide,
    needs_check,
    refusal_of,
)
from nfctl.agent.source import (
    GitSource,
    SourceError,
    SourceSettings,
    UnreachableRevisionError,
)
from tests.agent_harness import GitRepo, GpgKey

A, B, C = "a" * 40, "b" * 40, "c" * 40

POLICY = """\
apiVersion: nfctl.io/v1alpha1
kind: RolloutPolicy
metadata:
  name: fleet
spec:
  waves:
    - name: canary
      selector: {role: canary}
"""


# -- the decision ---------------------------------------------------------------------------
def test_without_policy_the_node_follows_the_head() -> None:
    d = decide(False, head=B, running=A, held=Approval(A), offered=Approval(C), refusal=None)
    assert (d.revision, d.governed, d.accept, d.reason) == (B, False, False, FOLLOWING_REF)


def test_new_approval_that_passed_its_checks_is_taken() -> None:
    d = decide(True, C, A, held=Approval(A), offered=Approval(B, "r1", 0), refusal=None)
    assert (d.revision, d.accept, d.reason) == (B, True, APPROVED)


def test_refused_approval_keeps_the_held_revision() -> None:
    d = decide(True, C, A, held=Approval(A), offered=Approval(B), refusal="not reachable")
    assert (d.revision, d.accept, d.reason) == (A, False, APPROVAL_REFUSED)
    assert "not reachable" in d.message and B[:12] in d.message


def test_joining_node_without_approval_waits_and_applies_nothing() -> None:
    d = decide(True, head=B, running=None, held=None, offered=None, refusal=None)
    assert (d.revision, d.accept, d.reason) == (None, False, AWAITING_APPROVAL)


def test_node_without_approval_holds_what_it_runs() -> None:
    d = decide(True, head=B, running=A, held=None, offered=None, refusal=None)
    assert (d.revision, d.reason) == (A, AWAITING_APPROVAL)


def test_refused_first_approval_holds_what_runs() -> None:
    d = decide(True, head=B, running=A, held=None, offered=Approval(C), refusal="unsigned")
    assert (d.revision, d.accept, d.reason) == (A, False, APPROVAL_REFUSED)


def test_held_approval_is_kept_whatever_the_head() -> None:
    # fail-static: the controller is gone, the branch moved on
    d = decide(True, head=C, running=A, held=Approval(A), offered=None, refusal=None)
    assert (d.revision, d.accept, d.reason) == (A, False, APPROVED)


def test_reapproving_the_held_revision_needs_no_check() -> None:
    held = Approval(A, "r1", 0)
    assert not needs_check(held, Approval(A, "r2", 1, "rollback"))
    assert needs_check(held, Approval(B))
    assert needs_check(None, Approval(A))
    d = decide(True, C, A, held, Approval(A, "r2", 1, "rollback"), refusal=None)
    assert (d.revision, d.accept) == (A, True)


def test_state_survives_a_round_trip(tmp_path: Path) -> None:
    state = ApprovalState(Approval(A, "r1", 2, "wave 3"), Approval(B), {"nf": ["h1"]})
    state.save(tmp_path)
    loaded = ApprovalState.load(tmp_path)
    assert loaded == state
    assert ApprovalState.load(tmp_path / "missing") == ApprovalState()


def test_corrupt_state_file_means_no_approval(tmp_path: Path) -> None:
    (tmp_path / "approval.json").write_text('{"held": {"revision": 5}}')
    assert ApprovalState.load(tmp_path).held is None


# -- reachability and policy files from real repositories ----------------------------------------
@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "repo")


def _source(repo: GitRepo, tmp: Path) -> GitSource:
    return GitSource(SourceSettings(url=f"file://{repo.path}", ref="main"), tmp / "state")


def test_ancestor_and_head_are_reachable(repo: GitRepo, tmp_path: Path) -> None:
    first = repo.commit("one")
    second = repo.commit("two")
    source = _source(repo, tmp_path)
    try:
        assert source.fetch() == second
        # the first fetch is shallow: the ancestor is fetched before it is judged
        source.check_reachable(second)
        source.check_reachable(first)
    finally:
        source.close()


def test_commit_outside_the_branch_is_refused(repo: GitRepo, tmp_path: Path) -> None:
    repo.commit("one")
    repo.git("checkout", "-q", "-b", "elsewhere")
    outside = repo.commit("on another branch")
    repo.git("checkout", "-q", "main")
    source = _source(repo, tmp_path)
    try:
        source.fetch()
        with pytest.raises(UnreachableRevisionError, match="not reachable from main"):
            source.check_reachable(outside)
        with pytest.raises(UnreachableRevisionError, match="not a full commit SHA"):
            source.check_reachable("HEAD~1")
    finally:
        source.close()


def test_commit_newer_than_the_last_fetch_is_fetched_then_accepted(
    repo: GitRepo, tmp_path: Path
) -> None:
    repo.commit("one")
    source = _source(repo, tmp_path)
    try:
        source.fetch()
        newer = repo.commit("two")  # the controller saw it before this agent fetched
        source.check_reachable(newer)
        assert source.fetched_sha() == newer
    finally:
        source.close()


def test_policy_file_read_from_the_tree(repo: GitRepo, tmp_path: Path) -> None:
    repo.write("nfs/x/nf.yaml", "kind: NetworkFunction\n")
    without = repo.commit("no policy")
    repo.write("nfs/rollout.yaml", POLICY)
    repo.write("nfs/big.yaml", "#" * 5000)
    (repo.path / "nfs" / "link.yaml").symlink_to("/etc/passwd")
    with_policy = repo.commit("policy")
    source = _source(repo, tmp_path)
    try:
        source.fetch()
        source.check_reachable(without)  # brings the whole history
        assert source.read_file(without, "nfs/rollout.yaml", 4096) is None
        assert source.read_file(with_policy, "nfs/rollout.yaml", 4096) == POLICY
        with pytest.raises(SourceError, match="too big"):
            source.read_file(with_policy, "nfs/big.yaml", 4096)
        with pytest.raises(SourceError, match="not a regular file"):
            source.read_file(with_policy, "nfs/link.yaml", 4096)
        assert source.read_file(with_policy, "nfs/x", 4096) is None  # a folder
    finally:
        source.close()


def test_unsigned_approval_refused_when_signatures_are_verified(
    repo: GitRepo, tmp_path: Path
) -> None:
    key = GpgKey.generate(tmp_path / "gnupg", "Release Key", "release@example.org")
    keys = tmp_path / "trusted"
    keys.mkdir()
    key.export(keys / "release.asc")
    signed = repo.commit_gpg_signed("signed", key)
    unsigned = repo.commit("unsigned, on the branch")
    source = GitSource(
        SourceSettings(
            url=f"file://{repo.path}", ref="main", verify_signatures=True, trusted_keys=keys
        ),
        tmp_path / "state",
    )
    try:
        source.fetch()
        assert refusal_of(source, signed, verify_signatures=True) is None
        why = refusal_of(source, unsigned, verify_signatures=True)
        assert why is not None and "not signed" in why and unsigned[:12] in why
        # without --verify-signatures, reachability is the only check
        assert refusal_of(source, unsigned, verify_signatures=False) is None
    finally:
        source.close()
