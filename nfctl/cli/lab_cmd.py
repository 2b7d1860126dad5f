"""`nfctl lab up|demo|status|down`."""

from __future__ import annotations

import typer

from nfctl.cli.output import OutputFormat, console, emit_data, err_console

lab_app = typer.Typer(
    help="A multi-node lab on this machine (network namespaces, root).", no_args_is_help=True
)


def _lab(tag: str) -> object:
    from nfctl.lab.lab import Lab

    return Lab(tag, say=lambda text: console.print(f"[cyan]lab[/cyan] {text}"))


@lab_app.command("up")
def up(
    nodes: int = typer.Option(3, "--nodes", min=2, max=20),
    tag: str = typer.Option("lab", "--tag", help="name of this lab (several can coexist)"),
    subnet: int = typer.Option(99, "--subnet", min=1, max=254, help="nodes get 10.<subnet>.0.<n>"),
) -> None:
    """Create the lab: nodes on a bridge, Git server, controller (mTLS), agents."""
    from nfctl.lab.lab import Lab, LabError

    lab = _lab(tag)
    assert isinstance(lab, Lab)
    try:
        lab.up(nodes, subnet)
        lab.save_info()
    except LabError as exc:
        err_console.print(f"[red]lab up failed:[/red] {exc}")
        raise typer.Exit(1) from None
    info = lab.describe()
    console.print(f"lab {tag!r} is up: controller {info['controller']}")
    console.print(f"  nfctl get nodes {info['operator_flags']}")
    console.print(f"  NF repo: {info['repo']} (commit and `git push`)")


@lab_app.command("demo")
def demo(
    nodes: int = typer.Option(3, "--nodes", min=3, max=20),
    tag: str = typer.Option("lab", "--tag"),
    subnet: int = typer.Option(99, "--subnet", min=1, max=254),
    down_after: bool = typer.Option(False, "--down", help="remove the lab when the demo ends"),
    fresh: bool = typer.Option(True, "--fresh/--reuse", help="start from a new lab"),
) -> None:
    """Walk through the GitOps story on a live lab; exit 0 only if every step behaved."""
    from nfctl.lab.demo import Demo
    from nfctl.lab.lab import Lab, LabError

    lab = _lab(tag)
    assert isinstance(lab, Lab)
    ok = False
    try:
        if fresh:
            lab.down(quiet=True)
        console.rule("[bold]nfctl lab demo")
        lab.up(nodes, subnet)
        lab.save_info()
        ok = Demo(lab, console).run()
    except LabError as exc:
        err_console.print(f"[red]lab failed:[/red] {exc}")
    finally:
        if down_after:
            lab.down(quiet=True)
            console.print("lab removed")
    raise typer.Exit(0 if ok else 1)


@lab_app.command("status")
def status(
    tag: str = typer.Option("lab", "--tag"),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
) -> None:
    """Nodes and NFs of a running lab, from its controller."""
    from nfctl.cli.fleet_cmd import _dict
    from nfctl.lab.demo import Demo
    from nfctl.lab.lab import Lab

    lab = _lab(tag)
    assert isinstance(lab, Lab)
    if not lab.is_up():
        err_console.print(f"lab {tag!r} is not running")
        raise typer.Exit(1)
    if output is OutputFormat.TEXT:
        Demo(lab, console).fleet()
        return
    # the same three tables as the text view, with the fields `nfctl get -o json` uses
    emit_data(
        {
            "lab": lab.describe(),
            "nodes": [_dict(n) for n in lab.nodes()],
            "functions": [_dict(f) for f in lab.functions()],
            "events": [_dict(e) for e in lab.history(limit=12)],
        },
        output,
    )


@lab_app.command("down")
def down(tag: str = typer.Option("lab", "--tag")) -> None:
    """Remove everything the lab created, also after a crash."""
    from nfctl.lab.lab import Lab

    lab = _lab(tag)
    assert isinstance(lab, Lab)
    removed = lab.down()
    if not removed:
        console.print(f"nothing to remove for lab {tag!r}")
