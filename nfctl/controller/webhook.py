"""Git push webhooks (GitHub, GitLab) turned into "reconcile now" for matching agents.

GitHub: X-Hub-Signature-256 = "sha256=" + HMAC-SHA256(secret, body).
GitLab: X-Gitlab-Token = secret. Bodies over the size limit are refused (413)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from nfctl.controller.fleet import Fleet
from nfctl.controller.node import NodeEntry

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20

ReconcileFn = Callable[[list[NodeEntry], str, str], Awaitable[tuple[list[str], list[str]]]]


def github_signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _header_bytes(request: web.Request, name: str) -> bytes:
    """The header as raw bytes: hmac.compare_digest refuses str with non-ASCII characters
    (TypeError, a 500), and an attacker chooses the header."""
    return request.headers.get(name, "").encode("utf-8", errors="surrogateescape")


def _branch(ref: str) -> str:
    for prefix in ("refs/heads/", "refs/tags/"):
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    return ref


def _repo_names(payload: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for section in ("repository", "project"):
        repo = payload.get(section) or {}
        if not isinstance(repo, dict):
            continue
        for key in ("name", "full_name", "path_with_namespace"):
            value = repo.get(key)
            if isinstance(value, str) and value:
                names.add(value.rsplit("/", 1)[-1].removesuffix(".git"))
    return names


def matching_nodes(fleet: Fleet, ref: str, repos: set[str]) -> list[NodeEntry]:
    """Agents following the pushed branch/tag, narrowed to the pushed repository when the
    agents' source URLs allow telling repositories apart."""
    branch = _branch(ref)
    by_ref = [e for e in fleet.nodes.values() if e.status.source.ref in (branch, ref)]
    if repos:
        by_repo = [
            e
            for e in by_ref
            if any(
                e.status.source.url.rstrip("/").removesuffix(".git").rsplit("/", 1)[-1] == r
                for r in repos
            )
        ]
        if by_repo:
            return by_repo
    return by_ref


class WebhookApp:
    """The HTTP receiver of Git push webhooks: checks the GitHub signature or GitLab token,
    then asks the agents following the pushed ref to reconcile now."""

    def __init__(
        self, fleet: Fleet, reconcile: ReconcileFn, secret: bytes | None, metrics: Any
    ) -> None:
        self.fleet = fleet
        self.reconcile = reconcile
        self.secret = secret
        self.metrics = metrics
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        self.app.add_routes(
            [
                web.post("/hooks/github", self.github),
                web.post("/hooks/gitlab", self.gitlab),
                web.get("/healthz", self.healthz),
            ]
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def _count(self, provider: str, result: str) -> None:
        self.metrics.webhooks.labels(provider=provider, result=result).inc()

    async def _body(self, request: web.Request, provider: str) -> bytes | web.Response:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            self._count(provider, "too_large")
            return web.Response(status=413, text="payload too large\n")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._count(provider, "too_large")
            return web.Response(status=413, text="payload too large\n")

    async def github(self, request: web.Request) -> web.Response:
        body = await self._body(request, "github")
        if isinstance(body, web.Response):
            return body
        if self.secret is None:
            self._count("github", "no_secret")
            return web.Response(status=403, text="webhook secret not configured\n")
        given = _header_bytes(request, "X-Hub-Signature-256")
        if not hmac.compare_digest(given, github_signature(self.secret, body).encode()):
            self._count("github", "bad_signature")
            return web.Response(status=401, text="bad signature\n")
        event = request.headers.get("X-GitHub-Event", "push")
        if event == "ping":
            self._count("github", "ping")
            return web.Response(text="pong\n")
        if event != "push":
            self._count("github", "ignored")
            return web.Response(status=202, text=f"ignored event {event}\n")
        return await self._push(body, "github", "after")

    async def gitlab(self, request: web.Request) -> web.Response:
        body = await self._body(request, "gitlab")
        if isinstance(body, web.Response):
            return body
        if self.secret is None:
            self._count("gitlab", "no_secret")
            return web.Response(status=403, text="webhook secret not configured\n")
        token = _header_bytes(request, "X-Gitlab-Token")
        if not hmac.compare_digest(token, self.secret):
            self._count("gitlab", "bad_token")
            return web.Response(status=401, text="bad token\n")
        event = request.headers.get("X-Gitlab-Event", "Push Hook")
        if event not in ("Push Hook", "Tag Push Hook"):
            self._count("gitlab", "ignored")
            return web.Response(status=202, text=f"ignored event {event}\n")
        return await self._push(body, "gitlab", "checkout_sha")

    async def _push(self, body: bytes, provider: str, sha_key: str) -> web.Response:
        try:
            payload = json.loads(body)
            ref = str(payload["ref"])
        except (ValueError, KeyError, TypeError):
            self._count(provider, "bad_payload")
            return web.Response(status=400, text="not a push payload\n")
        revision = str(payload.get(sha_key) or payload.get("after") or "")
        nodes = matching_nodes(self.fleet, ref, _repo_names(payload))
        sent, offline = await self.reconcile(nodes, revision, f"{provider} push to {ref}")
        self._count(provider, "delivered")
        log.info(
            "%s push %s %s: reconcile sent to %d agents", provider, ref, revision[:12], len(sent)
        )
        return web.json_response(
            {"ref": ref, "revision": revision, "nodes": sent, "offline": offline}
        )
