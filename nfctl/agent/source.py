"""The Git source: fetch a ref into a local mirror and materialise revisions as
immutable snapshots that the compiler reads.

Shallow fetches where the server allows; a timeout on every Git command; credentials
from files, passed through the environment so they never appear in argv or logs."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import git
from git.exc import ODBError

from nfctl.agent.snapshot import UnsafeTreeError, write_tree

log = logging.getLogger(__name__)

SHA_RE = re.compile(r"^[0-9a-f]{40}\Z")
KEEP_SNAPSHOTS = 3
TARGET_REF = "refs/nfctl/target"
MAINTAIN_EVERY = 50  # fetches
# Reading objects fails with these (missing, corrupt or unparsable objects).
OBJECT_ERRORS = (ODBError, git.GitError, ValueError, OSError)


class SourceError(RuntimeError):
    """Fetching or reading the source failed (unreachable, bad ref, timeout, ...)."""


class UntrustedRevisionError(SourceError):
    """The revision is not signed by a trusted key."""


class UnreachableRevisionError(SourceError):
    """The revision is not the followed ref's head or one of its ancestors."""


@dataclass(frozen=True)
class Revision:
    sha: str
    ref: str
    author: str
    author_email: str
    committed_at: float  # unix time
    message: str
    snapshot: Path  # a checkout of the whole tree at sha

    @property
    def short(self) -> str:
        return self.sha[:12]

    def describe(self) -> str:
        return f"{self.ref}@{self.short}"


@dataclass
class SourceSettings:
    url: str
    ref: str = "main"
    timeout: float = 60.0
    https_token_file: Path | None = None
    ssh_key_file: Path | None = None
    verify_signatures: bool = False
    trusted_keys: Path | None = None  # folder of *.asc/*.gpg OpenPGP keys, allowed_signers


_USERINFO_RE = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@\s]+)@")


def _mask_userinfo(match: re.Match[str]) -> str:
    scheme, userinfo = match.group(1), match.group(2)
    if ":" in userinfo or scheme.lower().startswith("http"):
        return f"{scheme}***@"  # a password, or an HTTP(S) token used as user name
    return match.group(0)  # ssh://git@host: a user name, not a secret


def redact(text: str) -> str:
    """Strip credentials that may appear in URLs (any scheme) inside messages."""
    return _USERINFO_RE.sub(_mask_userinfo, text)


def url_secrets(url: str) -> list[str]:
    """The secret parts of a URL's user info (password, or an HTTP(S) token)."""
    match = _USERINFO_RE.search(url)
    if match is None:
        return []
    userinfo = match.group(2)
    _user, sep, password = userinfo.partition(":")
    secrets = [userinfo] if sep or match.group(1).lower().startswith("http") else []
    if sep and password:
        secrets.append(password)
    return secrets


class GitSource:
    """The NF repository as seen by one agent: a local mirror fetched from the configured
    ref, and immutable per-revision snapshots that the compiler reads (commit signatures
    checked when verification is on)."""

    def __init__(self, settings: SourceSettings, state_dir: Path) -> None:
        self.settings = settings
        self.mirror = state_dir / "git" / "mirror.git"
        self.snapshots = state_dir / "git" / "snapshots"
        self._gnupg_home: Path | None = None
        self._seeded = False  # the mirror holds the ref: fetch incrementally, not shallow
        self._mirror_ready = False  # checked once per process
        self._keyring_files: tuple[tuple[str, int, int], ...] | None = None
        self._objects: git.Repo | None = None
        self._fetches = 0

    # -- environment -------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = {
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": "/bin/true",
            "LC_ALL": "C",
        }
        s = self.settings
        if s.ssh_key_file:
            env["GIT_SSH_COMMAND"] = (
                f"ssh -i {s.ssh_key_file} -o IdentitiesOnly=yes -o BatchMode=yes "
                "-o StrictHostKeyChecking=accept-new"
            )
        if s.https_token_file:
            token = s.https_token_file.read_text().strip()
            # git reads extra config from the environment: the token stays out of argv
            env.update(
                {
                    "GIT_CONFIG_COUNT": "1",
                    "GIT_CONFIG_KEY_0": "http.extraHeader",
                    "GIT_CONFIG_VALUE_0": f"Authorization: Bearer {token}",
                }
            )
        if self._gnupg_home is not None:
            env["GNUPGHOME"] = str(self._gnupg_home)
        return env

    def _git(self, *args: str, cwd: Path | None = None) -> str:
        repo = git.Git(str(cwd or self.mirror))
        try:
            with repo.custom_environment(**self._env()):
                out = repo.execute(
                    ["git", *args],
                    kill_after_timeout=self.settings.timeout,
                    with_extended_output=False,
                )
        except git.GitCommandError as exc:
            stderr = (exc.stderr or "").strip().removeprefix("stderr: ").strip("'\n ")
            raise SourceError(self.scrub(f"git {args[0]} failed: {stderr or exc}")) from None
        return str(out)

    def scrub(self, text: str) -> str:
        """Remove every credential this source knows from a message: git's own errors may
        quote a URL in forms redact() does not recognise (e.g. a git:// host name)."""
        secrets = url_secrets(self.settings.url)
        if self.settings.https_token_file:
            with contextlib.suppress(OSError):
                secrets.append(self.settings.https_token_file.read_text().strip())
        for secret in sorted(filter(None, secrets), key=len, reverse=True):
            text = text.replace(secret, "***")
        return redact(text)

    # -- fetch -------------------------------------------------------------------------
    def _ensure_mirror(self) -> None:
        if self._mirror_ready:
            return
        if (self.mirror / "HEAD").exists():
            current = self._git("config", "--get", "remote.origin.url").strip()
            if current != self.settings.url:
                self._git("remote", "set-url", "origin", self.settings.url)
        else:
            self.mirror.mkdir(parents=True, exist_ok=True)
            self._git("init", "--bare", "--quiet", str(self.mirror), cwd=self.mirror.parent)
            self._git("remote", "add", "origin", self.settings.url)
        # git fetch would start `git maintenance run --auto` after every fetch: a process
        # per pass for nothing most of the time. The agent runs it every MAINTAIN_EVERY.
        self._git("config", "maintenance.auto", "false")
        self._mirror_ready = True

    def fetch(self) -> str:
        """Fetch the configured ref; returns the commit sha it points to."""
        self._ensure_mirror()
        ref = self.settings.ref
        target = TARGET_REF
        if SHA_RE.match(ref):
            try:
                self._git("fetch", "--quiet", "--depth=1", "origin", f"+{ref}:{target}")
            except SourceError:
                # servers without allowReachableSHA1InWant need a full fetch
                self._git("fetch", "--quiet", "origin", "+refs/heads/*:refs/nfctl/heads/*")
                self._git("update-ref", target, ref)
        else:
            # Shallow only for the first fetch (a big history is never downloaded); later
            # fetches are incremental, which git answers twice as fast as shallow ones.
            if not self._seeded:
                self._seeded = self.fetched_sha() is not None
            depth = [] if self._seeded else ["--depth=1"]
            try:
                self._git(
                    "fetch", "--quiet", "--no-tags", *depth, "--force", "origin", f"+{ref}:{target}"
                )
            except SourceError as exc:
                if "couldn't find remote ref" in str(exc):
                    raise SourceError(
                        f"ref {ref!r} not found in {redact(self.settings.url)}"
                    ) from None
                raise
        self._seeded = True
        self._fetches += 1
        if self._fetches % MAINTAIN_EVERY == 0:
            self._maintain()
        sha = self.fetched_sha()
        if sha is None:
            raise SourceError(f"fetched {ref!r} but {target} names no commit")
        return sha

    def _maintain(self) -> None:
        """Pack loose objects once enough fetches have left some (git decides)."""
        try:
            self._git("maintenance", "run", "--auto", "--quiet")
        except SourceError as exc:
            log.warning("git maintenance of the mirror failed: %s", exc)

    def fetched_sha(self) -> str | None:
        """The commit the last successful fetch brought (None before any)."""
        try:
            return str(git.Reference(self._repo(), TARGET_REF).commit.hexsha)
        except OBJECT_ERRORS:
            return None

    def _repo(self) -> git.Repo:
        """The mirror as a GitPython repository: its objects are read by long-lived
        `git cat-file` processes, one per agent, not a process per question."""
        if self._objects is None:
            self._ensure_mirror()
            self._objects = git.Repo(self.mirror)
        return self._objects

    # -- revisions -----------------------------------------------------------------------
    def commit_info(self, sha: str) -> Revision:
        """Describe sha's commit without materialising its snapshot (e.g. to report a
        refused revision)."""
        try:
            commit = self._repo().commit(sha)
            message = commit.message
            return Revision(
                sha=commit.hexsha,
                ref=self.settings.ref,
                author=str(commit.author.name or ""),
                author_email=str(commit.author.email or ""),
                committed_at=float(commit.committed_date),
                message=(
                    message.decode(errors="replace") if isinstance(message, bytes) else message
                ).strip(),
                snapshot=self.snapshots / commit.hexsha,
            )
        except OBJECT_ERRORS as exc:
            raise SourceError(self.scrub(f"cannot read commit {sha[:12]}: {exc}")) from None

    def revision(self, sha: str) -> Revision:
        """Materialise sha as a snapshot (once) and describe its commit."""
        revision = self.commit_info(sha)
        if not revision.snapshot.is_dir():
            self._checkout(revision.sha, revision.snapshot)
        return revision

    def _checkout(self, sha: str, snapshot: Path) -> None:
        self.snapshots.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.snapshots, prefix=".tmp-"))
        try:
            write_tree(self._repo().commit(sha).tree, tmp)
            os.rename(tmp, snapshot)
        except (UnsafeTreeError, *OBJECT_ERRORS) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SourceError(self.scrub(f"cannot check out {sha[:12]}: {exc}")) from None
        self._prune_snapshots(keep={sha})

    def _prune_snapshots(self, keep: set[str]) -> None:
        entries = sorted(
            (p for p in self.snapshots.iterdir() if SHA_RE.match(p.name)),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in entries[KEEP_SNAPSHOTS:]:
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
        for tmp in self.snapshots.glob(".tmp-*"):
            if time.time() - tmp.stat().st_mtime > 600:
                shutil.rmtree(tmp, ignore_errors=True)

    def keep_snapshot(self, sha: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.snapshots / sha)

    # -- reachability ------------------------------------------------------------------------
    def check_reachable(self, sha: str) -> None:
        """Require sha to be the fetched head of the followed ref or one of its ancestors:
        a controller may pick among the branch's commits, never one outside it. Objects the
        mirror lacks (a shallow first fetch, a commit newer than our last fetch) are fetched
        once before refusing."""
        if not SHA_RE.match(sha):
            raise UnreachableRevisionError(f"{sha[:64]!r} is not a full commit SHA")
        if self._reaches(sha):
            return
        if (self.mirror / "shallow").exists():
            self._git(
                "fetch", "--quiet", "--no-tags", "--unshallow", "--force", "origin",
                f"+{self.settings.ref}:{TARGET_REF}",
            )  # fmt: skip
        else:
            self.fetch()
        if not self._reaches(sha):
            head = self.fetched_sha() or "nothing"
            raise UnreachableRevisionError(
                f"revision {sha[:12]} is not reachable from {self.settings.ref} "
                f"(fetched {head[:12]})"
            )

    def _reaches(self, sha: str) -> bool:
        head = self.fetched_sha()
        if head is None:
            return False
        try:
            repo = self._repo()
            commit = repo.commit(sha)  # a missing object raises
            return sha == head or bool(repo.is_ancestor(commit, repo.commit(head)))
        except OBJECT_ERRORS:
            return False

    def read_file(self, sha: str, path: str, max_bytes: int) -> str | None:
        """The text of a regular file in sha's tree, without a checkout (None: no such
        file). A symlink or a file over max_bytes is an error: the tree is untrusted."""
        try:
            tree = self._repo().commit(sha).tree
            try:
                item = tree / path if path else tree
            except KeyError:
                return None
            if not isinstance(item, git.Blob):
                return None
            if item.mode & 0o170000 != 0o100000:
                raise SourceError(f"{path} in {sha[:12]} is not a regular file")
            if item.size > max_bytes:
                raise SourceError(f"{path} in {sha[:12]} is {item.size} bytes; too big")
            data: bytes = item.data_stream.read()
        except OBJECT_ERRORS as exc:
            raise SourceError(self.scrub(f"cannot read {path} of {sha[:12]}: {exc}")) from None
        return data.decode(errors="replace")

    # -- signatures ------------------------------------------------------------------------
    def verify(self, sha: str) -> str:
        """Require a good signature by a trusted key; returns the signer's key id."""
        keys = self.settings.trusted_keys
        if keys is None or not keys.is_dir():
            raise UntrustedRevisionError(
                "--verify-signatures needs --trusted-keys: a folder of OpenPGP public keys "
                "(*.asc, *.gpg) and/or an SSH allowed_signers file"
            )
        self._prepare_keyring(keys)
        ssh_allowed = keys / "allowed_signers"
        extra: list[str] = []
        if ssh_allowed.is_file():
            extra = ["-c", f"gpg.ssh.allowedSignersFile={ssh_allowed}"]
        out = self._git(*extra, "log", "-1", "--format=%G?%x00%GK%x00%GS", sha)
        status, key, signer = [*out.strip().split("\x00"), "", "", ""][:3]
        if status == "G":
            return key or signer
        reasons = {
            "N": "the commit is not signed",
            "B": "the signature is bad",
            "U": "the signature's validity is unknown",
            "X": "the signature has expired",
            "Y": "the signing key has expired",
            "R": "the signing key was revoked",
            "E": "the signing key is not among the trusted keys",
        }
        raise UntrustedRevisionError(
            f"commit {sha[:12]} refused: {reasons.get(status, f'signature status {status!r}')}"
        )

    def close(self) -> None:
        """Stop the object readers; remove the private keyring (and the gpg-agent that
        importing keys may start)."""
        if self._objects is not None:
            self._objects.close()
            self._objects = None
        if self._gnupg_home is None:
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["gpgconf", "--kill", "all"],
                env={**os.environ, "GNUPGHOME": str(self._gnupg_home)},
                capture_output=True,
                check=False,
                timeout=30,
            )
        shutil.rmtree(self._gnupg_home, ignore_errors=True)
        self._gnupg_home = None
        self._keyring_files = None

    def _prepare_keyring(self, keys: Path) -> None:
        """A private keyring holding exactly the trusted folder's OpenPGP keys. Rebuilt
        from scratch when the folder changes: a key the operator removes is no longer
        trusted (importing into the old keyring would keep it forever)."""
        files = sorted(p for p in keys.iterdir() if p.suffix in (".asc", ".gpg", ".pub", ".key"))
        fingerprint = tuple(
            (p.name, st.st_mtime_ns, st.st_size) for p in files for st in [p.stat()]
        )
        if self._gnupg_home is not None and fingerprint == self._keyring_files:
            return
        self.close()
        self._gnupg_home = Path(tempfile.mkdtemp(prefix="nfctl-gnupg-"))
        os.chmod(self._gnupg_home, 0o700)
        self._keyring_files = fingerprint
        for key_file in files:
            proc = subprocess.run(
                ["gpg", "--batch", "--quiet", "--import", str(key_file)],
                env={**os.environ, "GNUPGHOME": str(self._gnupg_home)},
                capture_output=True,
                text=True,
                check=False,
                timeout=30,
            )
            if proc.returncode != 0:
                log.warning("cannot import trusted key %s: %s", key_file, proc.stderr.strip())
        # every imported key is trusted: the operator chose the folder
        listing = subprocess.run(
            ["gpg", "--batch", "--with-colons", "--list-keys"],
            env={**os.environ, "GNUPGHOME": str(self._gnupg_home)},
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        fingerprints = [
            line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")
        ]
        if fingerprints:
            ownertrust = "".join(f"{fp}:6:\n" for fp in fingerprints)
            subprocess.run(
                ["gpg", "--batch", "--import-ownertrust"],
                input=ownertrust,
                env={**os.environ, "GNUPGHOME": str(self._gnupg_home)},
                capture_output=True,
                text=True,
                check=False,
            )
