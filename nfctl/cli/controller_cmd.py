"""`nfctl controller` and `nfctl certs`."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from nfctl.cli.output import console, err_console

if TYPE_CHECKING:
    from nfctl.controller.config import ControllerConfig
    from nfctl.controller.enroll import EnrollmentConfig

certs_app = typer.Typer(
    help="Certificates: a CA for a lab, node enrolment and its approval by operators."
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
    enroll_listen: str = typer.Option(
        None,
        "--enroll-listen",
        help="node enrolment address (TLS, no client certificate; needs --tls-ca-key)",
    ),
    tls_ca_key: Path = typer.Option(
        None, "--tls-ca-key", help="the CA's private key: signs enrolled nodes' certificates"
    ),
    enroll_token_file: Path = typer.Option(
        None, "--enroll-token-file", help="bootstrap token: one first enrolment per node name"
    ),
    enroll_cert_hours: float = typer.Option(
        24.0, "--enroll-cert-hours", help="lifetime of enrolled nodes' certificates"
    ),
    source: str = typer.Option(
        None,
        "--source",
        help="the NF repository the agents follow (Git URL): the controller reads its "
        "RolloutPolicy and drives rollouts (docs/rollouts.md); unset: no rollouts",
    ),
    source_ref: str = typer.Option("main", "--ref", help="branch (or refs/...) of --source"),
    source_path: str = typer.Option(
        "", "--path", help="folder of --source the agents follow (where rollout.yaml is)"
    ),
    source_interval: float = typer.Option(
        30.0, "--source-interval", help="seconds between fetches of --source (webhooks: now)"
    ),
    repo_dir: Path = typer.Option(
        None, "--repo-dir", help="bare mirror of --source [default: next to the --db file]"
    ),
    prometheus_url: str = typer.Option(
        None, "--prometheus-url", help="Prometheus for promql gates that name no url"
    ),
    rollout_tick: float = typer.Option(
        1.0, "--rollout-tick", help="seconds between two steps of the rollout engine"
    ),
) -> None:
    """Run the controller: fleet status, events and commands over gRPC; Git webhooks."""
    from nfctl.controller.config import ControllerConfig

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
        source_url=source or None,
        source_ref=source_ref,
        source_path=source_path,
        source_interval=source_interval,
        repo_dir=repo_dir,
        prometheus_url=prometheus_url or None,
        rollout_tick=rollout_tick,
    )
    try:
        config.validate()
        enrollment = _enrollment_config(
            config, enroll_listen, tls_ca_key, enroll_token_file, enroll_cert_hours
        )
    except ValueError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    from nfctl.controller.storage import StoreUnavailable

    try:
        asyncio.run(_run_with_enrollment(config, enrollment))
    except StoreUnavailable as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


def _enrollment_config(
    config: ControllerConfig,
    listen: str | None,
    ca_key: Path | None,
    token_file: Path | None,
    cert_hours: float,
) -> EnrollmentConfig | None:
    from nfctl.controller.enroll import EnrollmentConfig

    if not listen:
        return None
    if config.insecure or not (config.tls_ca and config.tls_cert and config.tls_key):
        raise ValueError("--enroll-listen needs TLS (--tls-ca, --tls-cert, --tls-key)")
    if ca_key is None:
        raise ValueError("--enroll-listen needs --tls-ca-key (the CA key signs node certificates)")
    if cert_hours <= 0:
        raise ValueError("--enroll-cert-hours must be positive")
    return EnrollmentConfig(
        listen=listen,
        db=config.db,
        # the name the controller gives itself when --replica is not set (server.py)
        replica=config.replica or f"{socket.gethostname()}-{os.getpid()}",
        ca_cert=config.tls_ca,
        ca_key=ca_key,
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
        token_file=token_file,
        cert_hours=cert_hours,
    )


async def _run_with_enrollment(
    config: ControllerConfig, enrollment: EnrollmentConfig | None
) -> None:
    from nfctl.controller.enroll import EnrollmentServer
    from nfctl.controller.server import run

    server = EnrollmentServer(enrollment) if enrollment else None
    if server is not None:
        await server.start()
    try:
        await run(config)
    finally:
        if server is not None:
            await server.stop()


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


@certs_app.command("enroll")
def certs_enroll(
    node: str = typer.Option(..., "--node", help="this node's name (the certificate's CN)"),
    controller_address: str = typer.Option(
        ..., "--controller", help="the controller's enrolment address (host:port)"
    ),
    tls_ca: Path = typer.Option(
        ..., "--tls-ca", help="CA certificate the controller is checked with"
    ),
    directory: Path = typer.Option(
        Path("/var/lib/nfctl/identity"),
        "--dir",
        help="where the node's key (created here, never sent) and certificate live",
    ),
    token_file: Path = typer.Option(
        None, "--token-file", help="bootstrap token (first enrolment; not needed to renew)"
    ),
    server_name: str = typer.Option(
        None, "--server-name", help="name to check in the controller's certificate"
    ),
    keep: bool = typer.Option(
        False, "--keep", help="stay running and renew at 2/3 of the lifetime (a sidecar)"
    ),
) -> None:
    """Enrol this node: make its key here, get a certificate for its name from the controller."""
    import grpc

    from nfctl.agent.enroll import enroll, keep_enrolled

    token = token_file.read_text().strip() if token_file else None
    if keep:  # a sidecar: never exits on a failed attempt, retries instead
        keep_enrolled(controller_address, tls_ca, node, directory, token, server_name=server_name)
        return
    try:
        identity = enroll(
            controller_address, tls_ca, node, directory, token, server_name=server_name
        )
    except grpc.RpcError as exc:
        err_console.print(f"[red]enrolment refused: {exc.code().name}: {exc.details()}[/red]")
        raise typer.Exit(1) from None
    console.print(
        f"{'renewed' if identity.renewal else 'enrolled'} {node}: {identity.cert} {identity.key}"
    )


@certs_app.command("approve")
def certs_approve(
    node: str = typer.Argument(..., help="node name"),
    db: str = typer.Option(
        "/var/lib/nfctl/controller.db",
        "--db",
        help="the controller's database: its SQLite file, or the postgresql:// URL its "
        "replicas share (an approval is then good on every replica, used once)",
        envvar="NFCTL_DB",
    ),
    by: str = typer.Option("operator", "--by", help="who approves (recorded)"),
) -> None:
    """Allow one more enrolment of an enrolled node name (e.g. a reinstalled node)."""
    from nfctl.controller.storage import StoreUnavailable, open_enrollments

    try:
        store = open_enrollments(db)
    except StoreUnavailable as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    try:
        approved = store.approve(node, by)
    except StoreUnavailable as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    finally:
        store.close()
    if not approved:
        err_console.print(
            f"[red]{node} has never enrolled: its first enrolment needs no approval[/red]"
        )
        raise typer.Exit(1)
    console.print(f"approved: {node} may enrol once more with the bootstrap token")
