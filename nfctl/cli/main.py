"""nfctl: GitOps for eBPF network functions."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import typer

from nfctl import __version__
from nfctl.cli import exitcodes
from nfctl.cli.output import OutputFormat, console, emit_data, print_diagnostic
from nfctl.cli.progress import PROGRESS, reporting

app = typer.Typer(
    name="nfctl",
    help="GitOps controller for eBPF network functions (XDP/TC, BCC, live updates).",
    no_args_is_help=True,
    add_completion=False,
    epilog=exitcodes.HELP,
    pretty_exceptions_enable=False,
)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    _setup_logging(verbose)


@app.command()
def version() -> None:
    """Print nfctl's version."""
    console.print(__version__)


@app.command()
def validate(
    path: Path = typer.Argument(..., help="folder of NF manifests (nf.yaml), or one manifest"),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
    no_compile: bool = typer.Option(
        False, "--no-compile", help="check manifests and sources only; skip BCC and the verifier"
    ),
    show_logs: bool = typer.Option(False, "--logs", help="print full compiler/verifier logs"),
    unconfined_compile: bool = typer.Option(
        False,
        "--unconfined-compile",
        help="compile WITHOUT the sandbox (machines without namespaces only): the "
        "repository can then read any file you can read",
    ),
    show_progress: bool | None = PROGRESS,
) -> None:
    """Validate manifests, compile every program and check it with the kernel verifier.

    Exit code 0 only when every NF is valid. Designed for the CI of an NF repository."""
    import dataclasses

    from rich.markup import escape

    from nfctl.compiler.sandbox import allow_unconfined
    from nfctl.diagnostics import Diagnostic
    from nfctl.validate import validate_path

    allow_unconfined(unconfined_compile)

    with reporting(show_progress):
        report = validate_path(path, compile_programs=not no_compile)
    if output is not OutputFormat.TEXT:
        emit_data(report.to_dict(), output)
        raise typer.Exit(0 if report.ok else 1)

    def show(diag: Diagnostic) -> None:
        # file names and field paths come from the repository: never read them as markup
        field = escape(diag.field) if diag.field else None
        print_diagnostic(dataclasses.replace(diag, file=escape(diag.file), field=field), show_logs)

    for diag in report.errors + report.warnings:
        show(diag)
    for nf in report.nfs:
        label = escape(nf.name or "(unnamed)")
        manifest = escape(nf.manifest)
        if nf.ok:
            timing = f"{nf.compile_seconds + nf.load_seconds:.2f}s" if nf.program_name else "-"
            console.print(
                f"[green]✓[/green] {label} [dim]{manifest}[/dim] {nf.hook} "
                f"v{escape(nf.version or '')} build {(nf.build_hash or '')[:12]} ({timing})"
            )
        else:
            console.print(f"[red]✗[/red] {label} [dim]{manifest}[/dim]")
            for diag in nf.errors:
                show(diag)
    bad = sum(1 for nf in report.nfs if not nf.ok)
    summary = f"{len(report.nfs)} network function(s), {bad} invalid, {report.seconds:.2f}s"
    console.print(f"[{'green' if report.ok else 'red'}]{summary}[/]")
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def doctor(
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
    fix: bool = typer.Option(False, "--fix", help="link kernel headers and mount bpffs first"),
    preflight: bool = typer.Option(
        False,
        "--preflight",
        help="init container mode: on failure post a Kubernetes Event on this pod and check "
        "again every --recheck seconds until the node can run NFs (no crash loop)",
    ),
    recheck: float = typer.Option(300.0, "--recheck", help="seconds between preflight checks"),
    kube_api: str = typer.Option(None, "--kube-api", help="API URL [default: in-cluster]"),
    kube_token_file: Path = typer.Option(None, "--kube-token-file"),
    kube_ca_file: Path = typer.Option(None, "--kube-ca-file"),
) -> None:
    """Check that this machine can compile, load and attach eBPF network functions."""
    from nfctl import doctor as doc

    if preflight:
        from nfctl.cli.preflight import run_preflight

        raise typer.Exit(run_preflight(recheck, kube_api, kube_token_file, kube_ca_file))
    fixes = doc.apply_fixes() if fix else []
    checks = doc.run_checks()
    ok = all(c.ok for c in checks)
    if output is not OutputFormat.TEXT:
        emit_data(
            {"ok": ok, **doc.summary(), "fixes": fixes, "checks": [c.to_dict() for c in checks]},
            output,
        )
        raise typer.Exit(0 if ok else 1)
    for line in fixes:
        console.print(f"[cyan]fix[/cyan] {line}")
    for check in checks:
        mark = "[green]✓[/green]" if check.ok else "[red]✗[/red]"
        console.print(f"{mark} {check.name}: ", end="")
        console.print(check.message, markup=False, highlight=False)
        if not check.ok and check.fix:
            console.print(f"    fix: {check.fix}", markup=False, highlight=False)
    raise typer.Exit(0 if ok else 1)


def _register_commands() -> None:
    from nfctl.cli import (
        agent_cmd,
        controller_cmd,
        fleet_cmd,
        lab_cmd,
        ops_cmd,
        rollout_cmd,
        teardown_cmd,
        test_cmd,
    )
    from nfctl.cli.completion import completion, enable_shell_completion
    from nfctl.cli.diff_cmd import diff
    from nfctl.cli.top_cmd import top

    app.command(name="agent")(agent_cmd.agent)
    app.command(name="status")(agent_cmd.status)
    app.command(name="controller")(controller_cmd.controller)
    app.add_typer(controller_cmd.certs_app, name="certs")
    app.add_typer(fleet_cmd.get_app, name="get")
    app.add_typer(rollout_cmd.rollout_app, name="rollout")
    app.add_typer(lab_cmd.lab_app, name="lab")
    app.command(name="events", help="Events from the controller; --watch streams them.")(
        fleet_cmd.get_events
    )
    app.command(name="reconcile")(ops_cmd.reconcile)
    app.command(name="suspend")(ops_cmd.suspend)
    app.command(name="resume")(ops_cmd.resume)
    app.command(name="teardown")(teardown_cmd.teardown)
    app.command(name="completion")(completion)
    app.command(
        name="diff",
        short_help="Preview what a revision or working tree would change on a node or the fleet.",
    )(diff)
    app.command(name="top")(top)
    enable_shell_completion()
    app.command(name="test")(test_cmd.test)
    summarise(app)


def summarise(group: typer.Typer) -> None:
    """Give every command of group and of its subgroups its one-line summary."""
    for info in group.registered_commands:
        if info.short_help is None and info.callback is not None and info.callback.__doc__:
            info.short_help = one_line_summary(info.callback.__doc__)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            summarise(sub.typer_instance)


def one_line_summary(docstring: str) -> str:
    """A command's first sentence, on one line: a group's overview (`nfctl --help`, `nfctl
    get --help`, ...) shows the short help as written, so the docstring's own line breaks
    would cut its rows."""
    paragraph = " ".join(inspect.cleandoc(docstring).split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s+(?=[A-Z])", paragraph, maxsplit=1)[0]


_register_commands()
