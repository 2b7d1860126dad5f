"""Fetch: which revision of the source to reconcile to. Git unreachable keeps the last
revision (or, after a restart, the last one in the local mirror); a commit whose signature
does not verify stalls the agent on what runs."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

from nfctl.agent.reconcile.ports import GitPort, Metrics
from nfctl.agent.reconcile.summary import Notice
from nfctl.agent.source import Revision, SourceError, UntrustedRevisionError

log = logging.getLogger(__name__)


@dataclass
class SourceState:
    """What carries over between fetches."""

    revision: Revision | None = None  # the revision reconciled to last
    error: str | None = None  # the last fetch error; None once a fetch succeeds
    stalled: tuple[str, str] | None = None  # (reason, message): cannot go on from here


@dataclass
class Fetched:
    revision: Revision | None  # to reconcile to; None: nothing to reconcile
    notices: list[Notice] = field(default_factory=list)
    newly_unavailable: bool = False  # the status must say so before the notice goes out
    fetched: str | None = None  # the tip of the followed ref, when fetched and accepted
    refused: str | None = None  # a commit refused (signature)


def revision_to_reconcile(fetched: str) -> str:
    """The one place that decides which commit this node runs: today the tip of the
    followed ref. (A rollout approval picks an ancestor of it here.)"""
    return fetched


def fetch_revision(
    source: GitPort, state: SourceState, ref: str, verify: bool, metrics: Metrics | None
) -> Fetched:
    started = time.monotonic()
    notices: list[Notice] = []
    try:
        tip = source.fetch()
        if state.error is not None:
            notices.append(
                Notice("SourceAvailable", f"fetched {ref} again", revision=state.revision)
            )
        state.error = None
        if metrics:
            metrics.fetch(time.monotonic() - started, True)
    except SourceError as exc:
        if metrics:
            metrics.fetch(time.monotonic() - started, False)
        message = str(exc)
        result = Fetched(None)
        if message != state.error:
            state.error = message
            result.newly_unavailable = state.stalled is None
            kept = state.revision.short if state.revision else "nothing"
            result.notices.append(
                Notice(
                    "SourceUnavailable",
                    f"{message}; keeping {kept}",
                    warning=True,
                    revision=state.revision,
                )
            )
        result.revision = state.revision or last_fetched(source, state, verify)
        return result
    sha = revision_to_reconcile(tip)
    try:
        if verify:
            signer = source.verify(sha)
            log.debug("revision %s signed by %s", sha[:12], signer)
        revision = source.revision(sha)
    except UntrustedRevisionError as exc:
        if state.stalled != ("UntrustedRevision", str(exc)):
            refused: Revision | None = None
            with contextlib.suppress(SourceError):  # name the refused commit
                refused = source.commit_info(sha)
            notices.append(Notice("RevisionRefused", str(exc), warning=True, revision=refused))
        state.stalled = ("UntrustedRevision", str(exc))
        return Fetched(None, notices, refused=sha)
    except SourceError as exc:
        state.error = str(exc)
        return Fetched(state.revision, notices)
    state.stalled = None
    state.revision = revision
    return Fetched(revision, notices, fetched=revision.sha)


def last_fetched(source: GitPort, state: SourceState, verify: bool) -> Revision | None:
    """After a restart with Git unreachable: the last revision in the local mirror."""
    try:
        sha = source.fetched_sha()
        if sha is None:
            return None
        if verify:
            # the mirror also holds fetched revisions that were refused
            source.verify(sha)
        state.revision = source.revision(sha)
    except (SourceError, OSError):
        return None
    return state.revision
