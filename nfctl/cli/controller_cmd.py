"""`nfctl controller` and `nfctl certs`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from nfctl.cli.output import console, err_console

certs_app = typer.Typer(
    help="Create a CA and certificates for a lab (mTLS between agents and controller)."
)


def controller(
    listen: str = typer.Option(
        "0.0.0.0:9443", "--listen", help="gRPC address (mTLS, or plaintext with --insecure)"
    ),
    operator_listen: str = typer.Option(
        None,
        "--operator-listen",
        help=(
            "extra gRPC address: TLS without client certificates; "
            "operators authenticate with --operator-token-file"
        ),
    ),
    db: str = typer.Option(
        "/var/lib/nfctl/controller.db",
        "--db",
        help="SQLite database file (one controller), or a postgresql:// URL shared by "
        "several controller replicas",
        envvar="NFCTL_DB",
    ),
    replica: str = typer.Option(
        "",
        "--replica",
        help="this replica's name with a PostgreSQL store [default: hostname-pid]",
    ),
    event_retention: float = typer.Option(
        0.0,
        "--event-retention",
        help="PostgreSQL store: seconds of events and commands the leader keeps (0: all)",
    ),
    tls_ca: Path = typer.Option(None, "--tls-ca"),
    tls_cert: Path = typer.Option(None, "--tls-cert"),
    tls_key: Path = typer.Option(None, "--tls-key"),
    insecure: bool = typer.Option(
        False, "--insecure", help="plaintext; only on a loopback --listen address"
    ),
    operator_token_file: Path = typer.Option(
        None,
        "--operator-token-file",
        help="bearer token operators may use instead of a client certificate",
    ),
    webhook_addr: str = typer.Option(
        "0.0.0.0:9080",
        "--webhook-addr",
        help="HTTP address for /hooks/github, /hooks/gitlab ('' disables)",
    ),
    webhook_secret_file: Path = typer.Option(
        None, "--webhook-secret-file", help="HMAC secret (GitHub) / token (GitLab)"
    ),
    metrics_addr: str = typer.Option(
        "0.0.0.0:9102", "--metrics-addr", help="HTTP address for /metrics ('' disables)"
    ),
    health_listen: str = typer.Option(
        "0.0.0.0:9444",
        "--health-listen",
        help="plaintext gRPC health service for probes and load balancers, no client "
        "certificate, nothing else served ('' disables)",
    ),
    stale_after: float = typer.Option(
        60.0, "--stale-after", help="seconds without any message before a node is stale"
    ),
    heartbeat: float = typer.Option(
        None,
        "--heartbeat",
        help="seconds between agent heartbeats, at most half of --stale-after "
        "[default: stale-after / 3]",
    ),
) -> None:
    """Run the controller: fleet status, events and commands over gRPC; Git webhooks."""
    from nfctl.controller.server import ControllerConfig, run

    config = ControllerConfig(
        listen=listen,
        operator_listen=operator_listen or None,
        db=db,
        replica=replica,
        event_retention=event_retention,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        insecure=insecure,
        operator_token_file=operator_token_file,
        webhook_addr=webhook_addr or None,
        webhook_secret_file=webhook_secret_file,
        metrics_addr=metrics_addr or None,
        health_addr=health_listen or None,
        stale_after=stale_after,
        heartbeat=heartbeat,
    )
    try:
        config.validate()
    except ValueError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    from nfctl.controller.storage import StoreUnavailable

    try:
        asyncio.run(run(config))
    except StoreUnavailable as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


@certs_app.command("init")
def certs_init(
    directory: Path = typer.Option(
        ..., "--dir", help="where to write ca.crt/ca.key and the certificates"
    ),
    controller_names: str = typer.Option(
        "localhost,127.0.0.1",
        "--controller-names",
        help="DNS names and IPs the controller is reached at",
    ),
    nodes: str = typer.Option(
        "", "--nodes", help="node names (comma separated): one client certificate each"
    ),
    operators: str = typer.Option("operator", "--operators", help="operator certificate names"),
) -> None:
    """Create (or reuse) a CA and issue controller, node and operator certificates."""
    from nfctl.controller.certs import init

    issued = init(
        directory,
        [n.strip() for n in controller_names.split(",") if n.strip()],
        [n.strip() for n in nodes.split(",") if n.strip()],
        [n.strip() for n in operators.split(",") if n.strip()],
    )
    console.print(f"CA: {directory / 'ca.crt'}")
    for item in issued:
        console.print(f"  {item.name}: {item.cert} {item.key}")
