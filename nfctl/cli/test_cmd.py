"""`nfctl test PATH`: run the packet tests beside each NF (tests.yaml) in the kernel."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from nfctl.cli.output import OutputFormat, console, emit_data, print_diagnostic
from nfctl.cli.progress import PROGRESS, reporting


def test(
    path: Path = typer.Argument(..., help="folder of NFs (nf.yaml + tests.yaml), or one NF folder"),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
    junit: Path | None = typer.Option(None, "--junit", help="also write JUnit XML to this file"),
    show_logs: bool = typer.Option(False, "--logs", help="print full compiler/verifier logs"),
    show_progress: bool | None = PROGRESS,
) -> None:
    """Compile each NF (confined, like validate), load it unattached and run its tests.yaml
    cases with BPF_PROG_TEST_RUN on private copies of its maps.

    Exit code 0 only when every case passes and nothing failed to load."""
    import dataclasses

    from nfctl.nftest.results import junit_xml, render_failure
    from nfctl.nftest.runner import run_tests

    target = path if path.is_dir() or path.name not in ("tests.yaml", "tests.yml") else path.parent
    with reporting(show_progress):
        report = run_tests(target)
    if junit is not None:
        junit.write_text(junit_xml(report))
    if output is not OutputFormat.TEXT:
        emit_data(report.to_dict(), output)
        raise typer.Exit(0 if report.ok else 1)
    for diag in report.errors:
        field = escape(diag.field) if diag.field else None
        print_diagnostic(dataclasses.replace(diag, file=escape(diag.file), field=field), show_logs)
    for case in report.cases:
        mark = "[green]✓[/green]" if case.ok else "[red]✗[/red]"
        chain = f" [dim](chain {' -> '.join(case.chain)})[/dim]" if case.chain else ""
        console.print(f"{mark} {escape(case.nf)}: {escape(case.name)}{chain} ", end="")
        console.print(f"[dim]{escape(case.location)}[/dim]")
        for failure in case.failures:
            for line in render_failure(case.location, failure).splitlines():
                console.print(f"    {line}", markup=False, highlight=False)
    for name in report.untested:
        console.print(f"[yellow]-[/yellow] {escape(name)}: no tests.yaml")
    failed = sum(1 for c in report.cases if not c.ok)
    summary = (
        f"{len(report.cases)} case(s), {failed} failed, {len(report.errors)} error(s), "
        f"{report.runs} run(s); {report.seconds:.2f}s ({report.run_seconds:.3f}s running cases)"
    )
    console.print(f"[{'green' if report.ok else 'red'}]{summary}[/]")
    raise typer.Exit(0 if report.ok else 1)
