"""The settings of one `nfctl controller` replica, and which combinations are refused."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

MAX_AGENT_MESSAGE_BYTES = 2 << 20


@dataclass
class ControllerConfig:
    """One replica's settings (the `nfctl controller` options); validate() refuses unsafe
    or inconsistent ones before anything is opened."""

    listen: str = "0.0.0.0:9443"
    operator_listen: str | None = None  # TLS without client certs: operators with tokens
    db: str = "/var/lib/nfctl/controller.db"  # a SQLite file, or a postgresql:// URL
    replica: str = ""  # this replica's name with a shared store [default: host-pid]
    sync_interval: float = 0.5  # shared store: how often to read what other replicas wrote
    leader_interval: float = 1.0  # shared store: leader lock tries and checks
    event_retention: float = 0.0  # seconds of events and commands to keep; 0 keeps all
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    operator_token_file: Path | None = None
    webhook_addr: str | None = "0.0.0.0:9080"
    webhook_secret_file: Path | None = None
    metrics_addr: str | None = "0.0.0.0:9102"
    # plaintext gRPC health only (probes, load balancers): no client certificate, no fleet data
    health_addr: str | None = "0.0.0.0:9444"
    stale_after: float = 60.0
    heartbeat: float | None = None  # default stale_after / HEARTBEATS_PER_STALE
    flush_interval: float = 0.25
    status_persist_interval: float = 30.0  # heartbeat-only reports; see write_behind.py
    gc_freeze_interval: float = 0.1
    gc_compact_interval: float = 3600.0
    max_message_bytes: int = MAX_AGENT_MESSAGE_BYTES
    # Rollouts (docs/rollouts.md): the NF repository the agents follow, read by the
    # controller itself to learn revisions and their RolloutPolicy. None: no rollouts.
    source_url: str | None = None
    source_ref: str = "main"
    source_path: str = ""  # the folder of the repository the agents follow
    source_interval: float = 30.0  # seconds between fetches (a webhook fetches at once)
    repo_dir: Path | None = None  # the bare mirror [default: next to a SQLite db]
    prometheus_url: str | None = None  # for promql gates without their own url
    rollout_tick: float = 1.0  # seconds between two steps of the rollout engine

    def validate(self) -> None:
        if self.source_interval <= 0 or self.rollout_tick <= 0:
            raise ValueError("--source-interval and --rollout-tick must be positive")
        if self.stale_after <= 0:
            raise ValueError("--stale-after must be positive")
        if self.heartbeat is not None and not 0 < self.heartbeat * 2 <= self.stale_after:
            raise ValueError(
                f"--heartbeat {self.heartbeat:g} s must be positive and at most half of "
                f"--stale-after {self.stale_after:g} s: a node is stale only after it missed "
                "heartbeats, never between two"
            )
        if self.insecure:
            host = self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"
            try:
                loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(
                    "--insecure (plaintext) is only allowed on a loopback --listen address"
                )
        elif not (self.tls_ca and self.tls_cert and self.tls_key):
            raise ValueError(
                "TLS needs --tls-ca, --tls-cert and --tls-key (or --insecure on loopback)"
            )
