"""The agent's Node labels from the Kubernetes API: the client against a real HTTPS server
speaking the API's wire format (tests/kube_api.py), and a real agent that re-plans when its
Node is relabelled (an NF with a nodeSelector attached, then detached, without a restart)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfctl.agent.k8s_node import KubeApi, NodeClient, NodeLabelWatcher
from tests.agent_harness import events_of, tc_filter_present, wait_until
from tests.kube_api import FakeNodeApi
from tests.test_agent_features import Lab, lab, with_node_selector

__all__ = ["lab"]  # the fixture, shared with the agent feature tests

BASE = {
    "beta.kubernetes.io/arch": "amd64",
    "beta.kubernetes.io/os": "linux",
    "kubernetes.io/arch": "amd64",
    "kubernetes.io/os": "linux",
}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeNodeApi]:
    server = FakeNodeApi(tmp_path / "tls", "worker-7", {"role": "core"}).start()
    try:
        yield server
    finally:
        server.stop()


class Seen:
    def __init__(self) -> None:
        self.labels: list[dict[str, str]] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def on_labels(self, labels: dict[str, str]) -> None:
        with self.lock:
            self.labels.append(labels)

    def on_error(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)

    def last(self) -> dict[str, str]:
        with self.lock:
            return self.labels[-1] if self.labels else {}


def _watcher(api: FakeNodeApi, seen: Seen, token_file: Path | None = None) -> NodeLabelWatcher:
    client = NodeClient(KubeApi(api.url, token_file or api.token_file, api.ca_file), api.node)
    return NodeLabelWatcher(client, seen.on_labels, seen.on_error)


def test_client_reads_node_over_https_with_token(api: FakeNodeApi) -> None:
    client = NodeClient(KubeApi(api.url, api.token_file, api.ca_file), api.node)
    labels, version = client.get()
    assert labels == {**BASE, "kubernetes.io/hostname": "worker-7", "role": "core"}
    assert version == "100"
    # the CA is checked: the system trust store does not know this server
    untrusted = NodeClient(KubeApi(api.url, api.token_file, None), api.node)
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.get()


def test_watch_follows_changes_bookmarks_and_relists_on_410(api: FakeNodeApi) -> None:
    seen = Seen()
    watcher = _watcher(api, seen)
    watcher.start()
    try:
        wait_until(lambda: seen.last().get("role") == "core", 10, what="initial labels")
        wait_until(lambda: api.watch_count() == 1, 10, what="first watch")
        assert api.requests[-1][1]["resourceVersion"] == "100"
        assert api.requests[-1][1]["allowWatchBookmarks"] == "true"

        # MODIFIED: the new labels arrive through the open watch, no new list
        api.set_labels({"role": "edge", "zone": "b"})
        wait_until(lambda: seen.last().get("role") == "edge", 10, what="MODIFIED")
        assert seen.last()["zone"] == "b" and api.get_count() == 1
        count = len(seen.labels)

        # BOOKMARK then the server ends the stream: resume from the bookmark's version,
        # nothing delivered twice
        bookmark = api.bookmark()
        api.close_watches()  # queued after the bookmark: the client reads it first
        wait_until(lambda: watcher_version_seen(api, bookmark), 10, what="resume at bookmark")
        assert api.get_count() == 1 and len(seen.labels) == count

        # 410 as an ERROR event, with labels changed meanwhile: relist, and the new labels
        api.set_labels({"role": "core"}, notify=False)
        api.compact(as_event=True)
        wait_until(lambda: api.get_count() == 2, 10, what="relist after ERROR 410")
        wait_until(lambda: seen.last().get("role") == "core", 10, what="relisted labels")

        # 410 as the HTTP status of the next watch request: relist too
        api.set_labels({"role": "edge"}, notify=False)
        api.compact(as_event=False)
        wait_until(lambda: api.get_count() == 3, 10, what="relist after HTTP 410")
        wait_until(lambda: seen.last().get("role") == "edge", 10, what="relisted labels")
        assert not seen.errors, seen.errors
    finally:
        watcher.stop()
        api.close_watches()


def watcher_version_seen(api: FakeNodeApi, version: int) -> bool:
    return any(q.get("resourceVersion") == str(version) for _, q in api.requests)


def test_wrong_token_is_reported_and_retried(api: FakeNodeApi, tmp_path: Path) -> None:
    bad = tmp_path / "bad-token"
    bad.write_text("not-the-token\n")
    seen = Seen()
    watcher = _watcher(api, seen, token_file=bad)
    watcher.start()
    try:
        wait_until(lambda: len(seen.errors) >= 2, 10, what="retried errors")
        assert "HTTP 401" in seen.errors[0] and not seen.labels
        bad.write_text(api.token + "\n")  # a rotated token is read on the next request
        wait_until(lambda: seen.last().get("role") == "core", 15, what="labels after fix")
    finally:
        watcher.stop()
        api.close_watches()


@pytest.mark.kernel
def test_agent_replans_when_its_node_is_relabelled(lab: Lab) -> None:
    veth, repo = lab.veth, lab.repo
    repo.add_library_nf("counter")
    with_node_selector(repo, "counter", {"role": "edge"})
    c1 = repo.commit("counter on edge nodes only")
    api = FakeNodeApi(lab.tmp / "kube", "node-a", {"role": "core"}, netns=veth.ns_a).start()
    try:
        agent = lab.agent(
            "--kube-node-labels",
            "--kube-api",
            api.url,
            "--kube-token-file",
            str(api.token_file),
            "--kube-ca-file",
            str(api.ca_file),
            "--labels",
            "site=lab-k8s",  # a flag still overrides/adds to the Node's labels
        )
        agent.wait_ready(c1)
        assert agent.nf("counter")["state"] == "NotSelected"
        assert not tc_filter_present(veth)
        assert agent.status()["labels"]["role"] == "core"
        assert agent.status()["labels"]["site"] == "lab-k8s"
        assert agent.status()["labels"]["kubernetes.io/hostname"] == "node-a"
        pid = agent.proc.pid if agent.proc else 0
        code, body = agent.http_get("/readyz", port=9103)
        assert code == 200 and "datapath adopted" in body, body

        api.set_labels({"role": "edge"})  # kubectl label node node-a role=edge --overwrite
        wait_until(
            lambda: agent.nf("counter").get("state") == "Applied", 60, what="attached on edge"
        )
        wait_until(lambda: tc_filter_present(veth), 10, what="tc filter attached")
        assert agent.status()["labels"]["role"] == "edge"
        changed = events_of(agent, "NodeLabelsChanged")
        assert changed and "role=core->edge" in changed[-1]["message"], changed

        api.set_labels({"role": "core"})
        wait_until(lambda: agent.nf("counter").get("state") == "NotSelected", 60, what="detached")
        wait_until(lambda: not tc_filter_present(veth), 10, what="tc filter removed")
        assert agent.proc is not None and agent.proc.pid == pid  # no restart
        assert api.get_count() == 1  # one list, then the watch carried every change
    finally:
        api.stop()
