#!/usr/bin/env python3
"""Lab helper on the controller VM: the NF Git repository and fleet convergence checks.

    labctl.py seed --src /opt/nfctl/bpf --iface eth1   create the repo from the NF library
    labctl.py head                                     print the commit on main
    labctl.py block 192.168.56.12                      commit a blocklist entry, print the SHA
    labctl.py revert [SHA]                             git revert (default HEAD), print the SHA
    labctl.py wait-revision --sha SHA --nodes worker1,worker2 [--nf blocklist]

Run as root (the repository and the operator's key are root's). Uses PyYAML from the
project's .venv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

BARE = Path("/srv/git/nf-repo.git")
WORK = Path("/srv/nf-work")
NF_DIR = "nfs"
NFCTL = "/opt/nfctl/.venv/bin/nfctl"
TLS = Path("/etc/nfctl/tls")
IDENTITY = {
    "GIT_AUTHOR_NAME": "nfctl lab",
    "GIT_AUTHOR_EMAIL": "lab@nfctl.invalid",
    "GIT_COMMITTER_NAME": "nfctl lab",
    "GIT_COMMITTER_EMAIL": "lab@nfctl.invalid",
}
HEX = re.compile(r"[0-9a-f]{7,64}")


def git(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd or WORK,
        env={**os.environ, **IDENTITY},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"labctl: git {' '.join(args)} failed:\n{proc.stderr.strip()}")
    return proc.stdout.strip()


def sync_work() -> None:
    git("fetch", "-q", "origin")
    git("reset", "-q", "--hard", "origin/main")


def commit_and_push(message: str) -> str:
    git("add", "-A")
    git("commit", "-q", "-m", message)
    git("push", "-q", "origin", "HEAD:main")
    return git("rev-parse", "HEAD")


def cmd_seed(args: argparse.Namespace) -> int:
    if not BARE.exists():
        BARE.parent.mkdir(parents=True, exist_ok=True)
        git("init", "-q", "--bare", "-b", "main", str(BARE), cwd=BARE.parent)
    if not WORK.exists():
        git("clone", "-q", str(BARE), str(WORK), cwd=BARE.parent)
    if git("ls-remote", "origin", "main"):
        sync_work()
        print(f"labctl: repository exists, main at {git('rev-parse', 'HEAD')}")
        return 0
    git("checkout", "-q", "-B", "main")
    src = Path(args.src)
    for manifest in sorted(src.glob("*/nf.yaml")):
        dest = WORK / NF_DIR / manifest.parent.name
        shutil.copytree(manifest.parent, dest, dirs_exist_ok=True)
        doc = yaml.safe_load((dest / "nf.yaml").read_text())
        # Only the lab network: never the NAT interface Vagrant reaches the VMs through.
        doc["spec"]["attach"]["interfaces"] = [args.iface]
        (dest / "nf.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (WORK / "README.md").write_text(
        "# Lab NF repository\n\nSeeded from nfctl's bpf/ library by vagrant/lab/labctl.py.\n"
        f"NFs live in {NF_DIR}/<name>/nf.yaml and attach to {args.iface} only.\n"
    )
    sha = commit_and_push(f"Seed the NF library from nfctl bpf/ (interfaces: {args.iface})")
    print(sha)
    return 0


def cmd_head(_: argparse.Namespace) -> int:
    print(git("rev-parse", "main", cwd=BARE))
    return 0


def cmd_block(args: argparse.Namespace) -> int:
    sync_work()
    path = WORK / NF_DIR / args.nf / "nf.yaml"
    doc = yaml.safe_load(path.read_text())
    maps = doc["spec"].setdefault("maps", {})
    spec = maps.setdefault(args.map, {"managed": True})
    spec["managed"] = True
    entries = spec.setdefault("entries", [])
    if any(str(e.get("key")) == args.address for e in entries if isinstance(e, dict)):
        sys.exit(f"labctl: {args.address} is already in {args.nf}/{args.map}")
    entries.append({"key": args.address, "value": 1})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    print(commit_and_push(f"{args.nf}: block {args.address}"))
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    sync_work()
    git("revert", "--no-edit", args.sha)
    git("push", "-q", "origin", "HEAD:main")
    print(git("rev-parse", "HEAD"))
    return 0


# ----------------------------------------------------------------------------- convergence
# `nfctl get functions -o json` and `nfctl get nodes -o json` are read defensively: the
# per-node revision is any string field whose name contains "revision" (not "attempted")
# next to a node name, or a per-revision node count.

NODE_KEYS = ("node", "node_name", "nodeName", "name", "hostname")


def revision_matches(value: str, sha: str) -> bool:
    sha = sha.lower()
    return any(sha.startswith(h) or h.startswith(sha) for h in HEX.findall(value.lower()))


def find_nf(doc: Any, nf: str) -> list[Any]:
    """Sub-trees that describe the NF named nf."""
    found: list[Any] = []

    def visit(obj: Any) -> None:
        if isinstance(obj, dict):
            if any(obj.get(k) == nf for k in ("name", "nf", "function", "nf_name")):
                found.append(obj)
                return
            for key, value in obj.items():
                if key == nf:
                    found.append(value)
                else:
                    visit(value)
        elif isinstance(obj, list):
            for item in obj:
                visit(item)

    visit(doc)
    return found


def node_revisions(doc: Any, nodes: set[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)

    def visit(obj: Any, node: str | None) -> None:
        if isinstance(obj, dict):
            here = node
            for key in NODE_KEYS:
                value = obj.get(key)
                if isinstance(value, str) and value in nodes:
                    here = value
            for key, value in obj.items():
                lowered = str(key).lower()
                if key in nodes:
                    visit(value, str(key))
                elif (
                    here
                    and isinstance(value, str)
                    and "revision" in lowered
                    and "attempt" not in lowered
                ):
                    found[here].append(value)
                else:
                    visit(value, here)
        elif isinstance(obj, list):
            for item in obj:
                visit(item, node)

    visit(doc, None)
    return dict(found)


def revision_node_count(doc: Any, sha: str) -> int:
    total = 0

    def count(value: Any) -> int:
        if isinstance(value, bool):
            return 0
        if isinstance(value, int):
            return value
        if isinstance(value, list):
            return len(value)
        return 0

    def visit(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, dict):
            rev = obj.get("revision")
            if isinstance(rev, str) and revision_matches(rev, sha):
                for key in ("nodes", "count", "node_count", "nodeCount"):
                    total += count(obj.get(key))
            for key, value in obj.items():
                if HEX.fullmatch(str(key).lower()) and revision_matches(str(key), sha):
                    total += count(value)
                else:
                    visit(value)
        elif isinstance(obj, list):
            for item in obj:
                visit(item)

    visit(doc)
    return total


def converged(doc: Any, sha: str, nodes: set[str]) -> tuple[bool, str]:
    per_node = node_revisions(doc, nodes)
    if per_node:
        lines, ok = [], True
        for node in sorted(nodes):
            revs = per_node.get(node, [])
            good = bool(revs) and all(revision_matches(r, sha) for r in revs)
            ok &= good
            shown = sorted({(HEX.findall(r.lower()) or [r])[0][:12] for r in revs})
            lines.append(f"{node}={','.join(shown) or '-'}")
        return ok, " ".join(lines)
    n = revision_node_count(doc, sha)
    return n >= len(nodes), f"{n}/{len(nodes)} nodes at {sha[:12]}"


def nfctl_get(what: str, controller: str) -> Any:
    cmd = [NFCTL, "get", what, "-o", "json", "--controller", controller,
           "--tls-ca", str(TLS / "ca.crt"), "--tls-cert", str(TLS / "operator.crt"),
           "--tls-key", str(TLS / "operator.key")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"exit {proc.returncode}")
    return json.loads(proc.stdout)


def cmd_wait_revision(args: argparse.Namespace) -> int:
    nodes = {n for n in args.nodes.split(",") if n}
    deadline = time.monotonic() + args.timeout
    start = time.monotonic()
    last: Any = None
    status = "no answer yet"
    while time.monotonic() < deadline:
        try:
            last = nfctl_get("functions", args.controller)
            subtree = find_nf(last, args.nf) or [last]
            ok, status = converged(subtree, args.sha, nodes)
            if not ok and not node_revisions(subtree, nodes):
                # get functions has no per-node detail: the nodes' applied revisions then
                ok, status = converged(nfctl_get("nodes", args.controller), args.sha, nodes)
            if ok:
                print(f"labctl: {args.nf} at {args.sha[:12]} on {len(nodes)} node(s) after "
                      f"{time.monotonic() - start:.1f}s ({status})")  # fmt: skip
                return 0
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            status = f"nfctl get failed: {exc}"
        print(f"labctl: waiting for {args.sha[:12]}: {status}", file=sys.stderr)
        time.sleep(args.interval)
    print(f"labctl: timeout after {args.timeout}s: {status}", file=sys.stderr)
    if last is not None:
        print(json.dumps(last, indent=2)[:20000], file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labctl.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    seed = sub.add_parser("seed", help="create the NF repository from the NF library")
    seed.add_argument("--src", required=True)
    seed.add_argument("--iface", required=True)
    seed.set_defaults(func=cmd_seed)
    sub.add_parser("head", help="print main's commit").set_defaults(func=cmd_head)
    block = sub.add_parser("block", help="commit a blocklist entry for an IPv4 source")
    block.add_argument("address")
    block.add_argument("--nf", default="blocklist")
    block.add_argument("--map", default="blocked_v4")
    block.set_defaults(func=cmd_block)
    revert = sub.add_parser("revert", help="git revert a commit (default: HEAD)")
    revert.add_argument("sha", nargs="?", default="HEAD")
    revert.set_defaults(func=cmd_revert)
    wait = sub.add_parser("wait-revision", help="wait until every node runs a commit")
    wait.add_argument("--sha", required=True)
    wait.add_argument("--nodes", required=True)
    wait.add_argument("--nf", default="blocklist")
    wait.add_argument("--controller", default="127.0.0.1:9443")
    wait.add_argument("--timeout", type=float, default=180)
    wait.add_argument("--interval", type=float, default=2)
    wait.set_defaults(func=cmd_wait_revision)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
