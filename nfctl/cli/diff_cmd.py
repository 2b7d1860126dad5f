"""`nfctl diff`: what a revision (or a working tree) would change on a node, from the node's
state dir, without compiling or touching the kernel."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table
from rich.text import Text

from nfctl.cli import exitcodes
from nfctl.cli.fleet_cmd import CONN, Conn, with_conn
from nfctl.cli.output import OutputFormat, console, emit_data, err_console

if TYPE_CHECKING:  # imported when used: every nfctl command loads this module
    from nfctl.diff import DesiredNF, NFDiff, NodeDiff, NodeView
    from nfctl.manifest.model import NetworkFunction

CHANGE_COLORS = {
    "added": "green",
    "removed": "red",
    "rebuilt": "yellow",
    "updated": "cyan",
    "refused": "red",
    "unchanged": "dim",
    "not-selected": "dim",
}
NOT_COMPILED = (
    "Checked without compiling: the kernel verifier is not run here (`nfctl validate` does), "
    "and map entries are compared as written, not as the node encodes them."
)


@with_conn
def diff(
    tree: Path = typer.Argument(
        Path("."),
        help="the NF repository's working tree, or a folder in it (then the NF folder, as --path)",
    ),
    node_state: Path = typer.Option(
        None,
        "--node-state",
        help="one node: its agent's state dir (e.g. a copy of /var/lib/nfctl); "
        "without it, the nodes the controller knows",
    ),
    selector: str = typer.Option(None, "--selector", "-l", help="fleet: nodes with labels k=v,..."),
    nodes: str = typer.Option(None, "--nodes", help="fleet: node names, comma separated"),
    revision: str = typer.Option(
        None, "--revision", "-r", help="compare this commit of TREE instead of its working tree"
    ),
    path: str | None = typer.Option(
        None, "--path", help="NF folder inside the repository (default: each node's --path)"
    ),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
    conn: Conn = CONN,
) -> None:
    """Preview what a revision or working tree would change on one node (--node-state) or on
    the fleet (through the controller): NFs added, removed, rebuilt, updated (map entries,
    attach points) or refused, and nodeSelector effects. Nothing is compiled or changed.

    Exit code 0 when nothing would change, 1 when something would."""
    from nfctl.diff import diff_node

    tree, folder_given = _repository_root(tree)
    path = path or folder_given
    with contextlib.ExitStack() as stack:
        if node_state is not None:
            views = [(_load_node(node_state), path or _node_path(node_state) or ".")]
        else:
            views = _load_fleet(conn, selector, nodes, tree, path, stack)
        root, target = stack.enter_context(_materialise(tree, revision))
        by_folder: dict[str, tuple[list[DesiredNF], list[str]]] = {}
        results: list[tuple[NodeDiff, NodeView, list[str]]] = []
        for node, folder in views:
            if folder not in by_folder:
                by_folder[folder] = _load_desired(root, folder)
            desired, warnings = by_folder[folder]
            results.append((diff_node(node, desired, target), node, warnings))
    changed = any(r.changed for r, _, _ in results)
    if output is not OutputFormat.TEXT:
        if node_state is not None:
            [(result, _, warnings)] = results
            emit_data({**result.to_dict(), "warnings": warnings, "note": NOT_COMPILED}, output)
        else:
            emit_data(
                {
                    "target": target,
                    "changed": changed,
                    "nodes": [r.to_dict() for r, _, _ in results],
                    "note": NOT_COMPILED,
                },
                output,
            )
    else:
        if not results:
            console.print("no nodes matched")
        for result, node, warnings in results:
            _render(result, node, warnings)
        console.print(Text(NOT_COMPILED, style="dim"))
    raise typer.Exit(exitcodes.NOT_OK if changed else exitcodes.OK)


def _load_fleet(
    conn: Conn,
    selector: str | None,
    nodes: str | None,
    tree: Path,
    path: str | None,
    stack: contextlib.ExitStack,
) -> list[tuple[NodeView, str]]:
    """Each selected node as the controller reports it. The specs the nodes run are read from
    TREE's Git history at the revisions they report, so that history must hold them."""
    import git

    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
    from nfctl.cli.fleet_cmd import _selector, fleet_stub
    from nfctl.diff import AppliedView, NodeView

    with fleet_stub(conn) as (stub, md):
        resp = stub.ListNodes(pb.ListNodesRequest(selector=_selector(selector, nodes)), metadata=md)
    try:
        repo = git.Repo(tree, search_parent_directories=True)
    except (git.GitError, OSError) as exc:
        raise _fail(f"{tree}: a fleet diff needs the NF repository's Git history: {exc}") from None
    history = _History(repo, stack)
    views: list[tuple[NodeView, str]] = []
    for entry in resp.nodes:
        st = entry.status
        folder = path or st.source.path or "."
        applied: dict[str, AppliedView] = {}
        for fn in st.functions:
            if not fn.revision or not fn.build_hash:
                continue
            found = history.nf(fn.revision, folder, fn.name)
            if found is None:
                if not history.has(fn.revision):
                    raise _fail(
                        f"node {st.node}: NF {fn.name} runs revision {fn.revision[:12]}, which "
                        f"{tree} does not have (git fetch?)"
                    )
                raise _fail(
                    f"node {st.node}: NF {fn.name} (revision {fn.revision[:12]}) is not in "
                    f"{folder!r} at that revision: give the NF folder the nodes follow "
                    "(TREE or --path)"
                )
            nf, manifest, local_hash = found
            applied[fn.name] = AppliedView(
                name=fn.name,
                revision=fn.revision,
                build_hash=fn.build_hash,
                nf=nf,
                manifest=manifest,
                local_build_hash=local_hash,
                attached=tuple(f"{a.interface}/{a.hook}" for a in fn.attach_points),
            )
        node = NodeView(
            node=st.node,
            labels=dict(st.labels),
            kernel=st.kernel,
            applied=applied,
            revision=st.last_applied_revision or None,
            not_selected=frozenset(f.name for f in st.functions if f.state == "NotSelected"),
            suspended=st.suspended,
            suspended_nfs=frozenset(f.name for f in st.functions if f.suspended),
        )
        views.append((node, folder))
    return views


class _History:
    """Revisions of the repository written to temporary folders once each, and the NFs
    found in them (name -> spec, manifest path, build hash computed here)."""

    def __init__(self, repo: Any, stack: contextlib.ExitStack) -> None:
        self.repo = repo
        self.base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nfctl-diff-")))
        self.cache: dict[tuple[str, str], dict[str, tuple[NetworkFunction, str, str | None]]] = {}

    def nf(
        self, sha: str, folder: str, name: str
    ) -> tuple[NetworkFunction, str, str | None] | None:
        if (sha, folder) not in self.cache:
            self.cache[(sha, folder)] = self._scan(sha, folder)
        return self.cache[(sha, folder)].get(name)

    def has(self, sha: str) -> bool:
        import git

        try:
            self.repo.commit(sha)
        except (git.GitError, ValueError):
            return False
        return True

    def _scan(self, sha: str, folder: str) -> dict[str, tuple[NetworkFunction, str, str | None]]:
        import git

        from nfctl.agent.snapshot import UnsafeTreeError, write_tree
        from nfctl.compiler.client import prepare
        from nfctl.manifest.repo import scan_repo

        root = self.base / sha
        if not root.is_dir():
            try:
                commit = self.repo.commit(sha)
                root.mkdir()
                write_tree(commit.tree, root)
            except (git.GitError, ValueError, OSError, UnsafeTreeError):
                return {}
        if not (root / folder).is_dir():
            return {}
        found: dict[str, tuple[NetworkFunction, str, str | None]] = {}
        for manifest in scan_repo(root / folder, repo_root=root).manifests:
            if manifest.nf is not None:
                prepared = prepare(manifest, root)
                local = prepared.build_hash if prepared.ok else None
                found[manifest.nf.name] = (manifest.nf, manifest.rel_path, local)
        return found


def _repository_root(tree: Path) -> tuple[Path, str | None]:
    """TREE as the root of its Git working tree, and the folder TREE named inside it (None
    at the root, or outside Git): `nfctl diff nfs` from the repository's root, like `git`
    from a subfolder, compares that NF folder."""
    import git

    try:
        top = git.Repo(tree, search_parent_directories=True).working_tree_dir
    except (git.GitError, OSError):
        return tree, None
    if top is None:
        return tree, None
    root = Path(top).resolve()
    try:
        inner = tree.resolve().relative_to(root)
    except ValueError:  # a work tree set elsewhere (GIT_WORK_TREE): TREE is taken as given
        return tree, None
    return root, (inner.as_posix() if inner != Path(".") else None)


def _fail(message: str) -> typer.Exit:
    err_console.print(message, markup=False, highlight=False)
    return typer.Exit(exitcodes.USAGE)


def _node_path(state_dir: Path) -> str | None:
    from nfctl.agent.store import StateStore

    status = StateStore(state_dir).load_status()
    return status.source.path if status and status.source else None


def _load_node(state_dir: Path) -> NodeView:
    from pydantic import ValidationError

    from nfctl.agent.store import StateStore
    from nfctl.diff import AppliedView, NodeView
    from nfctl.manifest.model import NetworkFunction
    from nfctl.wire.status import NFState

    if not (state_dir / "status.json").is_file():
        raise _fail(f"{state_dir}: no agent state here (status.json is missing)")
    store = StateStore(state_dir)
    status = store.load_status()
    if status is None:
        raise _fail(f"{state_dir}/status.json: not a readable agent status")
    attached = {
        f.name: tuple(f"{a.interface}/{a.hook}" for a in f.attach_points) for f in status.functions
    }
    applied: dict[str, AppliedView] = {}
    for name, record in store.load_applied().items():
        try:
            nf = NetworkFunction.model_validate(record.spec)
        except ValidationError as exc:
            raise _fail(f"{state_dir}/applied.json: {name}: {exc}") from None
        applied[name] = AppliedView(
            name=name,
            revision=record.revision,
            build_hash=record.build_hash,
            nf=nf,
            manifest=record.manifest_path,
            local_build_hash=_local_hash(state_dir, record.revision, record.manifest_path),
            attached=attached.get(name, ()),
        )
    suspensions = store.suspensions()
    return NodeView(
        node=status.node,
        labels=dict(status.labels),
        kernel=status.kernel,
        applied=applied,
        revision=status.last_applied_revision,
        not_selected=frozenset(f.name for f in status.functions if f.state is NFState.NOT_SELECTED),
        suspended=suspensions.node,
        suspended_nfs=frozenset(suspensions.nfs),
    )


def _local_hash(state_dir: Path, revision: str, manifest_path: str) -> str | None:
    """The applied NF's build hash computed on this machine from the agent's own checkout of
    that revision, so that it compares with hashes computed here whatever the node's kernel."""
    from nfctl.compiler.client import prepare
    from nfctl.manifest.loader import load_manifest

    snapshot = state_dir / "git" / "snapshots" / revision
    manifest_file = snapshot / manifest_path
    if not revision or not manifest_file.is_file():
        return None
    prepared = prepare(load_manifest(manifest_file, snapshot), snapshot)
    return prepared.build_hash if prepared.ok else None


@contextlib.contextmanager
def _materialise(tree: Path, revision: str | None) -> Iterator[tuple[Path, str]]:
    """The tree to read, and how to name it: the working tree as is, or one commit of it
    written to a temporary folder (with the agent's checks against unsafe trees)."""
    if revision is None:
        if not tree.is_dir():
            raise _fail(f"{tree}: no such folder")
        yield tree.resolve(), f"working tree {tree.resolve()}"
        return
    import git

    from nfctl.agent.snapshot import UnsafeTreeError, write_tree

    try:
        repo = git.Repo(tree, search_parent_directories=True)
        commit = repo.commit(revision)
    except (git.GitError, ValueError, OSError) as exc:
        raise _fail(f"{tree}: cannot resolve revision {revision!r}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="nfctl-diff-") as tmp:
        root = Path(tmp)
        try:
            write_tree(commit.tree, root)
        except UnsafeTreeError as exc:
            raise _fail(f"{revision}: {exc}") from None
        yield root, f"{revision} ({commit.hexsha[:12]})"


def _load_desired(root: Path, folder: str) -> tuple[list[DesiredNF], list[str]]:
    from nfctl.compiler.client import prepare
    from nfctl.diff import DesiredNF
    from nfctl.manifest.repo import scan_repo

    target = root / folder
    if not target.is_dir():
        raise _fail(f"path {folder!r} does not exist in {root}")
    scan = scan_repo(target, repo_root=root)
    desired: list[DesiredNF] = []
    for manifest in scan.manifests:
        if manifest.nf is None:
            desired.append(DesiredNF(manifest.rel_path, None, errors=tuple(manifest.diagnostics)))
            continue
        prepared = prepare(manifest, root)
        errors = tuple(d for d in prepared.diagnostics if d.severity == "error")
        build = prepared.build_hash if prepared.bundle is not None else ""
        desired.append(DesiredNF(manifest.rel_path, manifest.nf, build, errors))
    return desired, [str(d) for d in scan.diagnostics]


def _render(result: NodeDiff, node: NodeView, warnings: list[str]) -> None:
    labels = ",".join(f"{k}={v}" for k, v in sorted(node.labels.items())) or "no labels"
    console.print(
        Text(
            f"node {result.node} ({labels}) runs {(result.revision or '-')[:12]}; "
            f"compared with {result.target}"
        )
    )
    for warning in warnings:
        console.print(Text(f"warning: {warning}", style="yellow"))
    table = Table(show_edge=False, header_style="bold")
    for column in ("NF", "CHANGE", "VERSION", "PROGRAM", "DETAILS"):
        table.add_column(column)
    for d in result.nfs:
        old, new = d.version
        version = f"{old} → {new}" if old and new and old != new else (old or new or "-")
        table.add_row(
            Text(d.name),
            Text(d.change.value, style=CHANGE_COLORS[d.change.value]),
            Text(version),
            Text(d.program.value if d.program else "-"),
            Text("\n".join(_details(d))),
        )
    console.print(table)
    counts: dict[str, int] = {}
    for d in result.nfs:
        counts[d.change.value] = counts.get(d.change.value, 0) + 1
    console.print(Text(", ".join(f"{n} {c}" for c, n in sorted(counts.items())) or "no NFs"))


def _details(d: NFDiff) -> list[str]:
    lines = list(d.notes)
    for name, (old, new) in d.attach.items():
        lines.append(f"attach {name}: {_short(old)} → {_short(new)}")
    if d.attached:
        lines.append("runs on " + ", ".join(d.attached))
    for map_name, changes in d.entries.items():
        for kind, sign in (("added", "+"), ("changed", "~"), ("removed", "-")):
            for entry in getattr(changes, kind):
                value = (
                    f"{_short(entry['old'])} → {_short(entry['new'])}"
                    if kind == "changed"
                    else _short(entry["value"])
                )
                lines.append(f"{map_name} {sign} {_short(entry['key'])}: {value}")
    for err in d.errors:
        lines.append(f"{err.location()}: {err.message}")
    return lines


def _short(value: object) -> str:
    text = "-" if value is None else value if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
