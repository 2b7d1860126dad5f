"""`nfctl teardown`: uninstall nfctl from this node (the uninstall Job runs it)."""

from __future__ import annotations

from pathlib import Path

import typer

from nfctl.cli.output import OutputFormat, console, emit_data, err_console


def teardown(
    bpffs_dir: Path = typer.Option(Path("/sys/fs/bpf/nfctl"), "--bpffs-dir"),
    state_dir: Path = typer.Option(Path("/var/lib/nfctl"), "--state-dir"),
    purge_state: bool = typer.Option(
        False, "--purge-state", help="also delete the state dir (Git mirror, status, events)"
    ),
    force: bool = typer.Option(False, "--force", help="even while an agent holds the state dir"),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
) -> None:
    """Detach and unpin every program, link and filter nfctl made on this node; programs
    of other tools stay. Stop the agent first (delete its DaemonSet)."""
    from nfctl.datapath.pins import NoBpffsError
    from nfctl.teardown import AgentRunningError
    from nfctl.teardown import teardown as run_teardown

    if not str(bpffs_dir).startswith("/sys/fs/bpf/"):
        err_console.print(f"--bpffs-dir {bpffs_dir} is not a folder under /sys/fs/bpf")
        raise typer.Exit(2)
    try:
        report = run_teardown(bpffs_dir, state_dir, purge_state=purge_state, force=force)
    except AgentRunningError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except NoBpffsError as exc:
        err_console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None
    if output is not OutputFormat.TEXT:
        emit_data(report.to_dict(), output)
        return
    for line in report.detached:
        console.print(f"detached {line}", markup=False, highlight=False)
    for line in report.links:
        console.print(f"detached link {line}", markup=False, highlight=False)
    console.print(f"unpinned {len(report.unpinned)} object(s) under {bpffs_dir}")
    for line in report.kept:
        console.print(f"kept (not nfctl's) {line}", markup=False, highlight=False)
    if report.state_removed:
        console.print(f"removed {state_dir}")
