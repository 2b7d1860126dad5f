"""The agent's Git source against real repositories: snapshots as a checkout would write
them, commit details, incremental fetches, and trees a checkout must refuse."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from nfctl.agent.snapshot import safe_name
from nfctl.agent.source import GitSource, SourceError, SourceSettings
from tests.agent_harness import GitRepo

FIXED_DATES = {
    "GIT_AUTHOR_DATE": "2026-01-02T03:04:05Z",
    "GIT_COMMITTER_DATE": "2026-01-02T03:04:05Z",
}


@pytest.fixture
def upstream(tmp_path: Path) -> GitRepo:
    repo = GitRepo(tmp_path / "upstream")
    repo.write("nfs/fw/nf.c", "int xdp(void *ctx) { return 2; }\n")
    repo.write("nfs/fw/nf.yaml", "kind: NetworkFunction\n")
    repo.write("tools.sh", "#!/bin/sh\necho hi\n")
    (repo.path / "tools.sh").chmod(0o755)
    os.symlink("nfs/fw/nf.c", repo.path / "link.c")
    os.symlink("/etc/shadow", repo.path / "outside")
    repo.git("add", "-A")
    # a submodule entry (gitlink) without a .gitmodules: a checkout leaves an empty folder
    repo.git("update-index", "--add", "--cacheinfo", f"160000,{'1' * 40},vendor/lib")
    repo.git("commit", "-q", "-m", "first\n\nwith a body", env=FIXED_DATES)
    return repo


def source(tmp_path: Path, url: Path) -> GitSource:
    return GitSource(SourceSettings(url=f"file://{url}", ref="main"), tmp_path / "state")


def test_snapshot_matches_the_commit(tmp_path: Path, upstream: GitRepo) -> None:
    src = source(tmp_path, upstream.path)
    try:
        sha = src.fetch()
        assert sha == upstream.head()
        revision = src.revision(sha)
        snap = revision.snapshot
        assert (snap / "nfs/fw/nf.c").read_text() == "int xdp(void *ctx) { return 2; }\n"
        assert (snap / "tools.sh").stat().st_mode & 0o111
        assert not (snap / "nfs/fw/nf.yaml").stat().st_mode & 0o111
        assert os.readlink(snap / "link.c") == "nfs/fw/nf.c"
        assert os.readlink(snap / "outside") == "/etc/shadow"  # written, never followed
        assert (snap / "vendor/lib").is_dir() and not any((snap / "vendor/lib").iterdir())
        assert revision.author == "Alice Operator"
        assert revision.author_email == "alice@example.org"
        assert revision.message == "first\n\nwith a body"
        assert revision.committed_at == 1767323045.0
        config = ["git", "-C", str(src.mirror), "config", "maintenance.auto"]
        assert subprocess.run(config, capture_output=True, text=True).stdout.strip() == "false"
    finally:
        src.close()


def test_later_fetches_see_new_commits_loose_and_packed(tmp_path: Path, upstream: GitRepo) -> None:
    src = source(tmp_path, upstream.path)
    try:
        first = src.fetch()
        src.revision(first)
        upstream.write("nfs/fw/nf.c", "int xdp(void *ctx) { return 1; }\n")
        upstream.commit("drop all")
        second = src.fetch()  # a few objects: unpacked loose in the mirror
        assert second != first
        assert (src.revision(second).snapshot / "nfs/fw/nf.c").read_text().endswith("1; }\n")
        for i in range(150):  # above git's unpack limit: the mirror keeps a pack
            upstream.write(f"many/f{i}.txt", f"{i}\n")
        upstream.commit("many files")
        third = src.fetch()
        assert list((src.mirror / "objects/pack").glob("*.pack"))
        snap = src.revision(third).snapshot
        assert (snap / "many/f149.txt").read_text() == "149\n"
        assert src.fetched_sha() == third
    finally:
        src.close()


@pytest.mark.parametrize("hostile", ["..", ".git"])
def test_a_tree_a_checkout_refuses_is_refused(
    tmp_path: Path, upstream: GitRepo, hostile: str
) -> None:
    blob = upstream.git("hash-object", "-w", "--stdin", stdin="pwned\n")
    inner = upstream.git("mktree", stdin=f"100644 blob {blob}\t{hostile}\n")
    root = upstream.git("mktree", stdin=f"040000 tree {inner}\tnfs\n")
    commit = upstream.git("commit-tree", root, "-m", "hostile", "-p", "HEAD")
    upstream.git("update-ref", "refs/heads/main", commit)
    src = source(tmp_path, upstream.path)
    try:
        sha = src.fetch()
        with pytest.raises(
            SourceError, match=rf"cannot check out .*unsafe path.*nfs.*{re.escape(hostile)}'"
        ):
            src.revision(sha)
        assert not (src.snapshots / sha).exists()
        assert not list(src.snapshots.glob(".tmp-*"))
        assert not (tmp_path / "state" / "git" / "pwned").exists()
    finally:
        src.close()


def test_unreachable_source_is_a_clear_error(tmp_path: Path) -> None:
    src = source(tmp_path, tmp_path / "missing")
    try:
        with pytest.raises(SourceError, match="git fetch failed"):
            src.fetch()
        assert src.fetched_sha() is None
    finally:
        src.close()


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("nf.c", True),
        (".hidden", True),
        ("..", False),
        (".", False),
        ("", False),
        (".git", False),
        (".GIT", False),
        ("a/b", False),
        ("a\0b", False),
    ],
)
def test_safe_name(name: str, ok: bool) -> None:
    assert safe_name(name) is ok
