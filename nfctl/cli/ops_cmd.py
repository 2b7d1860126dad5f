"""Top-level reconcile / suspend / resume: through the controller, or on this node only
(--local, talking to the agent through its state dir)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from nfctl.cli.fleet_cmd import CONN, Conn, remote_command, with_conn

LOCAL_HELP = "act on the agent of this node (via --state-dir) instead of the controller"


@with_conn
def reconcile(
    selector: str = typer.Option(None, "--selector", "-l", help="nodes with these labels k=v,..."),
    nodes: str = typer.Option(None, "--nodes", help="node names, comma separated (default: all)"),
    revision: str = typer.Option("", "--revision", help="the commit that should be applied"),
    local: bool = typer.Option(False, "--local", help=LOCAL_HELP),
    state_dir: Path = typer.Option(Path("/var/lib/nfctl"), "--state-dir"),
    conn: Conn = CONN,
) -> None:
    """Make agents fetch and reconcile now instead of at their next interval."""
    if local:
        from nfctl.cli.agent_cmd import reconcile_local

        reconcile_local(state_dir)
        return
    remote_command("reconcile", conn, selector, nodes, revision=revision)


def _suspend_command(suspended: bool) -> Callable[..., None]:
    @with_conn
    def command(
        nf: str = typer.Option(None, "--nf", help="one NF (default: everything on the node)"),
        selector: str = typer.Option(None, "--selector", "-l", help="nodes with these labels"),
        nodes: str = typer.Option(None, "--nodes", help="node names, comma separated"),
        local: bool = typer.Option(False, "--local", help=LOCAL_HELP),
        state_dir: Path = typer.Option(
            None, "--state-dir", help="local: the agent's state dir (implies --local)"
        ),
        conn: Conn = CONN,
    ) -> None:
        if local or state_dir is not None:
            from nfctl.cli.agent_cmd import _set_suspended

            _set_suspended(state_dir or Path("/var/lib/nfctl"), nf, suspended)
            return
        if not selector and not nodes:
            from nfctl.cli.output import err_console

            err_console.print("name the nodes (--nodes or --selector), or use --local on a node")
            raise typer.Exit(2)
        remote_command("suspend" if suspended else "resume", conn, selector, nodes, nf=nf)

    command.__doc__ = (
        "Break glass: freeze nodes (or one NF) as they are; Git changes are not applied."
        if suspended
        else "Undo `nfctl suspend`: Git changes are applied again."
    )
    return command


suspend = _suspend_command(True)
resume = _suspend_command(False)
