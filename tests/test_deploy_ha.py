"""deploy/overlays/ha: rendered with `kubectl kustomize`, checked with
`kubernetes-validate --strict`, then what high availability relies on: 2+ controller
replicas on different nodes, a PodDisruptionBudget, the database URL from a Secret (no
PVC, no Secret shipped), readiness from the health port that reflects the database, and
only flags the controller CLI has. The generic checks of test_deploy.py run on it too."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import test_deploy as generic
from tests.conftest import REPO_ROOT

OVERLAY = "overlays/ha"


@pytest.fixture(scope="module")
def ha() -> generic.Rendered:
    return generic.render(OVERLAY)


def test_renders_and_validates_strict(ha: generic.Rendered, tmp_path: Path) -> None:
    out = tmp_path / "rendered.yaml"
    out.write_text(ha.text)
    for version in (None, generic.MIN_KUBERNETES):
        version_args = ["-k", version] if version else []
        generic.run(
            [*generic.kubernetes_validate(), "--strict", "--quiet", *version_args, str(out)]
        )


@pytest.mark.parametrize(
    "check",
    [
        generic.test_common_labels_and_namespace,
        generic.test_agent_daemonset_host_access,
        generic.test_agent_least_privilege,
        generic.test_agent_node_name_args_and_probes,
        generic.test_every_container_has_requests_and_limits,
        generic.test_network_policy_selects_controller,
    ],
    ids=lambda f: f.__name__,
)
def test_generic_checks(ha: generic.Rendered, check: object) -> None:
    assert callable(check)
    check(ha)


def test_replicas_spread_and_protected(ha: generic.Rendered) -> None:
    dep = ha.controller
    assert dep["spec"]["replicas"] >= 2
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate"
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    [rule] = generic.pod_spec(dep)["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert rule["topologyKey"] == "kubernetes.io/hostname"
    assert rule["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    pdb = ha.get("PodDisruptionBudget", "nfctl-controller")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]


def test_database_from_a_secret_and_no_local_state(ha: generic.Rendered) -> None:
    dep = ha.controller
    ctr = generic.container(dep, "controller")
    got = generic.flags(ctr["args"])
    assert got["--db"] == "$(NFCTL_DB)"
    env = {e["name"]: e for e in ctr["env"]}
    ref = env["NFCTL_DB"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("nfctl-controller-db", "url")
    assert got["--replica"] == "$(POD_NAME)"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert not ha.of_kind("PersistentVolumeClaim")
    assert all("persistentVolumeClaim" not in v for v in generic.pod_spec(dep)["volumes"])
    assert not ha.of_kind("Secret")  # created out of band, never overwritten by an apply
    # readiness from the plaintext health port: NOT_SERVING while the database is away
    assert ctr["readinessProbe"]["grpc"]["port"] == 9444
    assert "httpGet" not in ctr["readinessProbe"]


def test_flags_exist_in_the_cli(ha: generic.Rendered) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "nfctl", "controller", "--help"],
        capture_output=True, text=True, cwd=REPO_ROOT, check=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    ).stdout  # fmt: skip
    args = generic.container(ha.controller, "controller")["args"]
    assert args[0] == "controller"
    for flag in generic.flags(args):
        assert flag in help_text, f"{flag} is not an option of `nfctl controller`"


def test_every_replica_serves_enrolment(ha: generic.Rendered) -> None:
    """Enrolment records are in PostgreSQL (tests/test_enroll_pg.py): each replica keeps
    base's enrolment listener, its CA key and bootstrap token, and the Service routes the
    enrolment port to whichever replica is ready."""
    dep = ha.controller
    ctr = generic.container(dep, "controller")
    got = generic.flags(ctr["args"])
    assert got["--enroll-listen"] == "0.0.0.0:9445"
    assert got["--tls-ca-key"].startswith("/etc/nfctl/tls/")
    assert got["--enroll-token-file"].startswith("/etc/nfctl/auth/")
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert ports["enroll"] == 9445
    service = ha.get("Service", "nfctl-controller")
    [port] = [p for p in service["spec"]["ports"] if p["name"] == "enroll"]
    assert (port["port"], port["targetPort"]) == (9445, "enroll")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # `nfctl certs approve` inside a replica reads the shared database from NFCTL_DB
    assert {e["name"] for e in ctr["env"]} >= {"NFCTL_DB"}


# ----------------------------------------------------------------------------- vagrant


def vagrant_validate(ha: bool) -> set[str]:
    """`vagrant validate --ignore-provider` of the lab, with or without NFCTL_LAB_HA; the
    machines it validated."""
    vagrant_bin = generic.require_tool(shutil.which("vagrant"), "vagrant")
    env = {**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1", "NFCTL_LAB_HA": "1" if ha else "0"}
    out = generic.run(
        [vagrant_bin, "validate", "--ignore-provider"], cwd=generic.VAGRANT, timeout=180, env=env
    )
    assert "validated successfully" in out
    return set(re.findall(r"==> (\S+): Ignoring provider config", out))


def test_vagrant_lab_runs_two_controllers_on_postgresql() -> None:
    assert vagrant_validate(ha=False) == {"controller", "worker1", "worker2"}
    assert vagrant_validate(ha=True) == {"db", "controller", "controller2", "worker1", "worker2"}
    vagrantfile = (generic.VAGRANT / "Vagrantfile").read_text()
    assert '"provision/db.sh"' in vagrantfile and '"provision/controller2.sh"' in vagrantfile
    # both replicas run the same unit; its database comes from the provisioned env file
    unit = (generic.VAGRANT / "systemd" / "nfctl-controller.service").read_text()
    assert "--db ${NFCTL_DB}" in unit
    assert "EnvironmentFile=-/etc/nfctl/controller.env" in unit
    for script in ("controller.sh", "controller2.sh"):
        assert "provision/controller-db.sh" in (generic.VAGRANT / "provision" / script).read_text()
    # the password reaches libpq through the unit's environment, not the command line
    assert '"postgresql://nfctl@#{DB_IP}:5432/nfctl"' in vagrantfile
    assert "PGPASSWORD=" in (generic.VAGRANT / "provision" / "controller-db.sh").read_text()
    # the database accepts the two controllers only, by password, on the lab address
    db = (generic.VAGRANT / "provision" / "db.sh").read_text()
    assert "scram-sha-256" in db and "trust" not in db
    # agents are given every replica
    worker = (generic.VAGRANT / "provision" / "worker.sh").read_text()
    assert "NFCTL_CONTROLLER=${NFCTL_CONTROLLERS" in worker
