"""The controller's mirror of the NF repository: fetch, reachability, the policy of a
revision read with `git show`-like access (a real Git repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nfctl.controller.rollout.gitrepo import RepoError, RepoMirror
from tests.rollout_sim import Repo, git, policy_yaml


def test_the_mirror_reads_the_policy_of_each_revision_under_a_folder(tmp_path: Path) -> None:
    repo = Repo(tmp_path / "repo")
    none = repo.commit("no policy yet", {"edge/guard/nf.yaml": "# nf\n"})
    good = repo.commit("policy", {"edge/rollout.yaml": policy_yaml()})
    bad = repo.commit("broken", {"edge/rollout.yaml": policy_yaml().replace("bake: 1s", "bake: x")})
    mirror = RepoMirror(str(repo.path), "main", tmp_path / "mirror", path="edge/")
    assert mirror.fetch() == bad == mirror.head()
    assert not mirror.policy_at(none).present
    at_good = mirror.policy_at(good)
    assert at_good.file == "edge/rollout.yaml" and at_good.policy is not None
    at_bad = mirror.policy_at(bad)
    assert at_bad.policy is None and str(at_bad.diagnostics[0]).startswith("edge/rollout.yaml:12")
    assert mirror.is_ancestor(none, bad) and not mirror.is_ancestor(bad, none)
    assert mirror.commit(good).summary == "policy"


def test_a_symlinked_policy_is_refused(tmp_path: Path) -> None:
    repo = Repo(tmp_path / "repo")
    (repo.path / "elsewhere.yaml").write_text(policy_yaml())
    os.symlink("elsewhere.yaml", repo.path / "rollout.yaml")
    git(repo.path, "add", "-A")
    git(repo.path, "commit", "-q", "-m", "symlink")
    mirror = RepoMirror(str(repo.path), "main", tmp_path / "mirror")
    at = mirror.policy_at(mirror.fetch())
    assert at.present and at.policy is None
    assert "regular file" in at.diagnostics[0].message


def test_an_unreachable_source_is_a_clear_error(tmp_path: Path) -> None:
    mirror = RepoMirror(str(tmp_path / "nowhere"), "main", tmp_path / "mirror")
    with pytest.raises(RepoError, match="fetching main from the source failed"):
        mirror.fetch()
    assert mirror.head() == ""


def test_credentials_in_the_source_url_never_show_in_errors(tmp_path: Path) -> None:
    mirror = RepoMirror(
        "http://user:s3cret-token@127.0.0.1:9/nfs.git", "main", tmp_path / "mirror", timeout=10
    )
    with pytest.raises(RepoError) as raised:
        mirror.fetch()
    assert "s3cret-token" not in str(raised.value) and "***@" in str(raised.value)
