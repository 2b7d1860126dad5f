"""Agent configuration: flags, an optional YAML config file (same keys), environment."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from nfctl.datapath.pins import DEFAULT_BPFFS_ROOT


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    repo: str
    ref: str = "main"
    path: str = "."
    node: str = Field(default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname())
    labels: dict[str, str] = Field(default_factory=dict)
    labels_file: Path | None = Field(default=None, alias="labelsFile")
    interval: float = Field(default=30.0, gt=0)
    jitter: float = Field(default=0.1, ge=0, le=1)
    timeout: float = Field(default=60.0, gt=0)
    state_dir: Path = Field(default=Path("/var/lib/nfctl"), alias="stateDir")
    bpffs_dir: Path = Field(default=DEFAULT_BPFFS_ROOT, alias="bpffsDir")
    https_token_file: Path | None = Field(default=None, alias="httpsTokenFile")
    ssh_key_file: Path | None = Field(default=None, alias="sshKeyFile")
    verify_signatures: bool = Field(default=False, alias="verifySignatures")
    trusted_keys: Path | None = Field(default=None, alias="trustedKeys")
    drift: Literal["correct", "warn"] = "correct"
    drift_interval: float = Field(default=5.0, gt=0, alias="driftInterval")
    metrics_addr: str = Field(default="0.0.0.0:9101", alias="metricsAddr")
    health_addr: str = Field(default="127.0.0.1:9103", alias="healthAddr")
    liveness_stall: float = Field(default=600.0, gt=0, alias="livenessStall")
    # labels of this node's Node object (Kubernetes API); flags/labelsFile override them
    kube_node_labels: bool = Field(default=False, alias="kubeNodeLabels")
    kube_api: str | None = Field(default=None, alias="kubeApi")
    kube_token_file: Path | None = Field(default=None, alias="kubeTokenFile")
    kube_ca_file: Path | None = Field(default=None, alias="kubeCaFile")
    controller: str | None = None
    tls_ca: Path | None = Field(default=None, alias="tlsCa")
    tls_cert: Path | None = Field(default=None, alias="tlsCert")
    tls_key: Path | None = Field(default=None, alias="tlsKey")
    insecure: bool = False
    tc_priority: int = Field(default=10, ge=1, le=0xFFFF, alias="tcPriority")
    compile_standby: bool = Field(default=True, alias="compileStandby")

    @field_validator("bpffs_dir")
    @classmethod
    def _inside_bpffs(cls, v: Path) -> Path:
        if not str(v).startswith("/sys/fs/bpf/"):
            raise ValueError("must be a folder under /sys/fs/bpf")
        return v

    def all_labels(self) -> dict[str, str]:
        labels: dict[str, str] = {}
        if self.labels_file is not None:
            labels.update(read_labels_file(self.labels_file))
        labels.update(self.labels)
        return labels


def parse_labels(text: str) -> dict[str, str]:
    labels = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"label {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def read_labels_file(path: Path) -> dict[str, str]:
    """A YAML mapping, or key=value lines (the Kubernetes downward API format, with
    quoted values)."""
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict):
        return {str(k): str(v) for k, v in data.items()}
    labels = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        labels[key.strip()] = value.strip().strip('"')
    return labels


def load_config(config_file: Path | None, overrides: dict[str, Any]) -> AgentConfig:
    data: dict[str, Any] = {}
    if config_file is not None:
        loaded = yaml.safe_load(config_file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a YAML mapping")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return AgentConfig.model_validate(data)
