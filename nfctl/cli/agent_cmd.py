"""`nfctl agent` and the local commands that talk to an agent through its state dir."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import typer
from pydantic import ValidationError

from nfctl.cli.exitcodes import UNAPPROVED, UNAVAILABLE
from nfctl.cli.output import OutputFormat, console, emit_data, err_console

DEFAULT_STATE = Path("/var/lib/nfctl")


def agent(
    repo: str = typer.Option(
        None, "--repo", envvar="NFCTL_REPO", help="Git URL: file://, https://, ssh://, git://"
    ),
    ref: str = typer.Option(None, "--ref", help="branch, tag or commit [default: main]"),
    path: str = typer.Option(None, "--path", help="folder of NFs inside the repo [default: .]"),
    node: str = typer.Option(None, "--node", help="node name [default: $NODE_NAME, then hostname]"),
    labels: str = typer.Option(None, "--labels", help="node labels k=v,k2=v2"),
    labels_file: Path = typer.Option(None, "--labels-file", help="YAML mapping or k=v lines"),
    interval: float = typer.Option(
        None, "--interval", help="seconds between fetches [default: 30]"
    ),
    timeout: float = typer.Option(None, "--timeout", help="Git command timeout [default: 60]"),
    state_dir: Path = typer.Option(None, "--state-dir", help="[default: /var/lib/nfctl]"),
    bpffs_dir: Path = typer.Option(None, "--bpffs-dir", help="[default: /sys/fs/bpf/nfctl]"),
    https_token_file: Path = typer.Option(
        None, "--https-token-file", help="bearer token for HTTPS Git"
    ),
    ssh_key_file: Path = typer.Option(None, "--ssh-key-file", help="private key for SSH Git"),
    verify_signatures: bool = typer.Option(None, "--verify-signatures/--no-verify-signatures"),
    trusted_keys: Path = typer.Option(
        None, "--trusted-keys", help="folder of trusted OpenPGP keys / allowed_signers"
    ),
    drift: str = typer.Option(None, "--drift", help="correct | warn [default: correct]"),
    drift_interval: float = typer.Option(None, "--drift-interval", help="seconds [default: 5]"),
    metrics_addr: str = typer.Option(
        None, "--metrics-addr", help="host:port for /metrics ('' disables) [default: 0.0.0.0:9101]"
    ),
    health_addr: str = typer.Option(
        None, "--health-addr", help="host:port for /healthz, /readyz [default: 127.0.0.1:9103]"
    ),
    liveness_stall: float = typer.Option(
        None, "--liveness-stall", help="/healthz fails after a pass this long [default: 600]"
    ),
    kube_node_labels: bool = typer.Option(
        None,
        "--kube-node-labels/--no-kube-node-labels",
        help="watch this node's labels in the Kubernetes API (--labels still override)",
    ),
    kube_api: str = typer.Option(None, "--kube-api", help="API URL [default: in-cluster]"),
    kube_token_file: Path = typer.Option(None, "--kube-token-file"),
    kube_ca_file: Path = typer.Option(None, "--kube-ca-file"),
    controller: str = typer.Option(None, "--controller", help="controller host:port"),
    tls_ca: Path = typer.Option(None, "--tls-ca"),
    tls_cert: Path = typer.Option(None, "--tls-cert"),
    tls_key: Path = typer.Option(None, "--tls-key"),
    insecure: bool = typer.Option(
        None, "--insecure/--secure", help="plaintext to the controller (loopback only)"
    ),
    tc_priority: int = typer.Option(
        None, "--tc-priority", help="tc filter priority of nfctl's dispatcher [default: 10]"
    ),
    compile_standby: bool = typer.Option(
        None,
        "--compile-standby/--no-compile-standby",
        help="keep a compile worker with BCC loaded waiting: faster commits, ~75 MB [default: on]",
    ),
    config: Path = typer.Option(
        None, "--config", help="YAML file with the same settings (camelCase or snake_case)"
    ),
    once: bool = typer.Option(
        False,
        "--once",
        help="reconcile once; exit 0 if Ready. With --controller and a rollout policy: only "
        "an approved revision (the controller's, waiting up to 10 s, else the persisted "
        "one); exit 4 if there is none",
    ),
    unconfined_compile: bool = typer.Option(
        False,
        "--unconfined-compile",
        help="compile NF sources WITHOUT the sandbox (hosts without namespaces only): the "
        "NF repository can then read any file on this node, credentials included",
    ),
) -> None:
    """Run the node agent: pull NFs from Git and keep this node's datapath in sync."""
    from nfctl.agent.config import load_config, parse_labels
    from nfctl.agent.k8s_node import KubeApiError
    from nfctl.agent.runner import Agent
    from nfctl.agent.store import AgentLockedError
    from nfctl.compiler.sandbox import allow_unconfined
    from nfctl.datapath.pins import NoBpffsError

    # Command line only, never from the config file: opting out must be a visible choice.
    allow_unconfined(unconfined_compile)

    try:
        cfg = load_config(
            config,
            {
                "repo": repo,
                "ref": ref,
                "path": path,
                "node": node,
                "labels": parse_labels(labels) if labels else None,
                "labels_file": labels_file,
                "interval": interval,
                "timeout": timeout,
                "state_dir": state_dir,
                "bpffs_dir": bpffs_dir,
                "https_token_file": https_token_file,
                "ssh_key_file": ssh_key_file,
                "verify_signatures": verify_signatures,
                "trusted_keys": trusted_keys,
                "drift": drift,
                "drift_interval": drift_interval,
                "metrics_addr": metrics_addr,
                "health_addr": health_addr,
                "liveness_stall": liveness_stall,
                "kube_node_labels": kube_node_labels,
                "kube_api": kube_api,
                "kube_token_file": kube_token_file,
                "kube_ca_file": kube_ca_file,
                "controller": controller,
                "tls_ca": tls_ca,
                "tls_cert": tls_cert,
                "tls_key": tls_key,
                "insecure": insecure,
                "tc_priority": tc_priority,
                "compile_standby": compile_standby,
            },
        )
    except (ValidationError, ValueError, OSError) as exc:
        err_console.print(f"[red]invalid agent configuration:[/red] {exc}")
        raise typer.Exit(2) from None
    try:
        runner = Agent(cfg)
        if once:
            result = runner.run_once()
            _print_status(cfg.state_dir, OutputFormat.TEXT)
            if result.unapproved is not None:
                err_console.print(f"[red]no approved revision to apply:[/red] {result.unapproved}")
                raise typer.Exit(UNAPPROVED)
            raise typer.Exit(0 if result.ready else 1)
        runner.run()
    except AgentLockedError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except NoBpffsError as exc:
        err_console.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None
    except KubeApiError as exc:
        err_console.print(f"[red]cannot read this node's labels:[/red] {exc}")
        raise typer.Exit(2) from None


def status(
    state_dir: Path = typer.Option(DEFAULT_STATE, "--state-dir"),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
) -> None:
    """Show this node's agent status (from its state dir)."""
    raise typer.Exit(_print_status(state_dir, output))


def _print_status(state_dir: Path, output: OutputFormat) -> int:
    from nfctl.agent.store import StateStore

    store = StateStore(state_dir)
    status = store.load_status()
    if status is None:
        err_console.print(f"no agent status in {state_dir} (has the agent run?)")
        return 1
    if output is not OutputFormat.TEXT:
        emit_data(status.dump(), output)
        return 0 if status.ready else 1
    from nfctl.cli.render import render_node_status

    render_node_status(status)
    return 0 if status.ready else 1


def _signal_agent(state_dir: Path) -> bool:
    from nfctl.agent.store import StateStore

    pid = StateStore(state_dir).agent_pid()
    if not pid:
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    return True


def suspend(
    nf: str = typer.Option(None, "--nf", help="suspend one NF (default: the whole node)"),
    state_dir: Path = typer.Option(DEFAULT_STATE, "--state-dir"),
) -> None:
    """Break glass: freeze this node (or one NF) as it is; Git changes are not applied."""
    _set_suspended(state_dir, nf, True)


def resume(
    nf: str = typer.Option(None, "--nf", help="resume one NF (default: the whole node)"),
    state_dir: Path = typer.Option(DEFAULT_STATE, "--state-dir"),
) -> None:
    """Undo `nfctl suspend`."""
    _set_suspended(state_dir, nf, False)


def _set_suspended(state_dir: Path, nf: str | None, suspended: bool) -> None:
    from nfctl.agent.store import StateStore

    current = StateStore(state_dir).set_suspended(nf, suspended)
    signalled = _signal_agent(state_dir)
    what = f"NF {nf}" if nf else "node"
    console.print(
        f"{what} {'suspended' if suspended else 'resumed'} "
        f"(node: {current.node}, NFs: {', '.join(current.nfs) or 'none'})"
        + ("" if signalled else " — no running agent found; applies when it starts")
    )


def reconcile_local(state_dir: Path) -> None:
    if not _signal_agent(state_dir):
        err_console.print(f"no running agent for state dir {state_dir}")
        sys.exit(UNAVAILABLE)
    console.print("agent asked to reconcile now")
