"""The controller's read-only view of the NF repository: a bare mirror of one ref, fetched
periodically and on webhook, from which it learns new revisions and reads the RolloutPolicy
of a revision (`git show REV:path`). Nothing is checked out; the controller never builds."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import git

from nfctl.diagnostics import Diagnostic
from nfctl.manifest.loader import MAX_MANIFEST_BYTES
from nfctl.manifest.rollout import POLICY_NAMES, RolloutPolicy, parse_policy

log = logging.getLogger(__name__)

HEAD_REF = "refs/nfctl/head"


class RepoError(RuntimeError):
    """Fetching or reading the repository failed."""


@dataclass(frozen=True)
class CommitInfo:
    sha: str
    author: str
    committed_at: float
    summary: str


@dataclass(frozen=True)
class PolicyAt:
    """The policy file of one revision: absent, valid, or refused with diagnostics."""

    file: str  # repository path of the file ('' when the revision has none)
    policy: RolloutPolicy | None
    diagnostics: tuple[Diagnostic, ...] = ()

    @property
    def present(self) -> bool:
        return bool(self.file)


class RepoMirror:
    def __init__(
        self, url: str, ref: str, directory: Path, path: str = "", timeout: float = 60.0
    ) -> None:
        self.url = url
        self.ref = ref
        self.path = path.strip("/")
        self.timeout = timeout
        directory.mkdir(parents=True, exist_ok=True)
        self.repo = (
            git.Repo(directory)
            if (directory / "HEAD").exists()
            else git.Repo.init(directory, bare=True)
        )
        self._lock = threading.Lock()  # one git command at a time on the mirror

    def fetch(self) -> str:
        """Fetch the ref; returns its commit SHA."""
        source = self.ref if self.ref.startswith("refs/") else f"refs/heads/{self.ref}"
        with self._lock:
            try:
                self.repo.git.fetch(
                    "--no-tags",
                    "--quiet",
                    self.url,
                    f"+{source}:{HEAD_REF}",
                    kill_after_timeout=self.timeout,
                )
                return str(self.repo.git.rev_parse(f"{HEAD_REF}^{{commit}}"))
            except git.GitCommandError as exc:
                raise RepoError(f"fetching {self.ref} from the source failed: {exc}") from exc

    def head(self) -> str:
        with self._lock:
            try:
                return str(self.repo.git.rev_parse(f"{HEAD_REF}^{{commit}}"))
            except git.GitCommandError:
                return ""

    def commit(self, sha: str) -> CommitInfo:
        with self._lock:
            try:
                c = self.repo.commit(sha)
            except (ValueError, git.GitError) as exc:
                raise RepoError(f"no commit {sha}") from exc
            summary = c.summary if isinstance(c.summary, str) else c.summary.decode()
            return CommitInfo(
                c.hexsha, f"{c.author.name} <{c.author.email}>", float(c.committed_date), summary
            )

    def is_ancestor(self, older: str, newer: str) -> bool:
        with self._lock:
            try:
                self.repo.git.merge_base("--is-ancestor", older, newer)
                return True
            except git.GitCommandError:
                return False

    def policy_at(self, sha: str) -> PolicyAt:
        """`git show SHA:<path>/rollout.yaml`, parsed. A file that is not a regular blob
        (a symlink could point anywhere) is refused."""
        with self._lock:
            try:
                tree = self.repo.commit(sha).tree
                folder = tree / self.path if self.path else tree
            except (KeyError, ValueError, git.GitError):
                return PolicyAt("", None)
            for name in POLICY_NAMES:
                try:
                    blob = folder / name
                except KeyError:
                    continue
                rel = f"{self.path}/{name}" if self.path else name
                if blob.type != "blob" or blob.mode & 0o170000 != 0o100000:
                    problem = Diagnostic(file=rel, message="the policy must be a regular file")
                    return PolicyAt(rel, None, (problem,))
                if blob.size > MAX_MANIFEST_BYTES:
                    problem = Diagnostic(file=rel, message=f"policy is {blob.size} bytes; too big")
                    return PolicyAt(rel, None, (problem,))
                data = blob.data_stream.read()
                policy, problems = parse_policy(data, rel)
                return PolicyAt(rel, policy, tuple(problems))
        return PolicyAt("", None)
