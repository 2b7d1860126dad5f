"""No key lands in the repository or an image layer.

The image context is built the way `docker build` does (no daemon needed): every file
under the root except what .dockerignore excludes (Docker's rules: patterns anchored at
the context root, `**` for any depth, `!` re-includes, the last match wins), matched with
pathspec. `deploy/gen-secrets.sh` keeps its keys outside the repository by default and
refuses a folder inside it."""

from __future__ import annotations

import base64
import os
import posixpath
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pathspec
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.test_deploy import require_tool

REPO_ROOT = Path(__file__).resolve().parents[1]
PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
# Where people and tools put keys: gen-secrets' old default, `nfctl certs init --dir pki`,
# SSH deploy keys, secret manifests, a controller database with enrolments.
KEY_PLACES = [
    "nfctl-certs/ca.key",
    "nfctl-certs/node1.key",
    "pki/controller.key",
    "deploy/lab/ca.key",
    "nfctl/agent.key",
    "bpf/tls/server.pem",
    "id_ed25519",
    "scripts/id_rsa",
    "secrets.yaml",
    "controller.db",
]


def dockerignore(root: Path) -> pathspec.PathSpec[Any]:
    patterns = []
    for raw in (root / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if negate else line).lstrip("/")
        patterns.append(("!" if negate else "") + "/" + pattern)
    return pathspec.PathSpec.from_lines("gitignore", patterns)


def build_context(root: Path) -> list[str]:
    """The files `docker build root` sends (relative paths)."""
    spec = dockerignore(root)
    files = []
    for folder, dirs, names in os.walk(root):
        for name in names + [d for d in dirs if (Path(folder) / d).is_symlink()]:
            rel = (Path(folder) / name).relative_to(root).as_posix()
            if not spec.match_file(rel):
                files.append(rel)
    return sorted(files)


def private_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_image_context_of_this_tree_holds_no_private_key() -> None:
    context = build_context(REPO_ROOT)
    # the context is what the Dockerfile installs from, not an empty set
    assert {"pyproject.toml", "nfctl/__init__.py", "nfctl/controller/enroll.py"} <= set(context)
    assert any(f.startswith("bpf/") for f in context)
    leaks = []
    for rel in context:
        path = REPO_ROOT / rel
        is_file = path.is_file() and not path.is_symlink()
        if is_file and PEM_PRIVATE_KEY.search(path.read_bytes()):
            leaks.append(rel)
    assert not leaks, leaks


def test_keys_where_tools_write_them_stay_out_of_the_image(tmp_path: Path) -> None:
    root = tmp_path / "context"
    shutil.copytree(
        REPO_ROOT, root, symlinks=True, ignore=shutil.ignore_patterns(".git", ".venv", "*_cache")
    )
    for rel in KEY_PLACES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(private_key_pem())
    context = build_context(root)
    assert "pyproject.toml" in context and "nfctl/controller/certs.py" in context
    assert not set(KEY_PLACES) & set(context), set(KEY_PLACES) & set(context)


def test_keys_where_tools_write_them_are_git_ignored(tmp_path: Path) -> None:
    git = require_tool(shutil.which("git"), "git")
    proc = subprocess.run(
        [git, "check-ignore", "--no-index", "--stdin", "-v", "-n"],
        input="\n".join(KEY_PLACES[:-1]) + "\n",  # controller.db: only the image ignores it
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    not_ignored = [
        line.split("\t")[-1] for line in proc.stdout.splitlines() if line.startswith("::")
    ]
    assert proc.returncode == 0 and not not_ignored, proc.stdout + proc.stderr


def run_gen_secrets(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    require_tool(shutil.which("kubectl"), "kubectl")
    nfctl = REPO_ROOT / ".venv" / "bin" / "nfctl"
    env = dict(
        os.environ,
        HOME=str(tmp_path / "home"),
        XDG_STATE_HOME=str(tmp_path / "state"),
        NFCTL=os.environ.get("NFCTL", str(nfctl)),
    )
    return subprocess.run(
        ["bash", str(REPO_ROOT / "deploy" / "gen-secrets.sh"), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=120,
    )


def repo_files() -> set[str]:
    return {
        p.relative_to(REPO_ROOT).as_posix() for p in REPO_ROOT.rglob("*") if ".venv" not in p.parts
    }


def test_gen_secrets_keeps_keys_outside_the_repository(tmp_path: Path) -> None:
    before = repo_files()
    proc = run_gen_secrets(tmp_path)
    assert proc.returncode == 0, proc.stderr
    state = tmp_path / "state" / "nfctl" / "nfctl-system"
    assert (state / "ca.key").is_file() and (state / "bootstrap-token").is_file()
    assert oct((state / "ca.key").stat().st_mode & 0o777) == "0o600"
    assert repo_files() == before  # nothing written into the repository
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all(proc.stdout) if d}
    agent = {k: base64.b64decode(v) for k, v in secrets["nfctl-agent-tls"]["data"].items()}
    # agents get the CA certificate and the bootstrap token: no private key, nobody's
    assert set(agent) == {"ca.crt", "bootstrap-token"}
    assert not any(PEM_PRIVATE_KEY.search(v) for v in agent.values())
    controller = secrets["nfctl-controller-tls"]["data"]
    assert {"ca.crt", "ca.key", "controller.crt", "controller.key"} == set(controller)


@pytest.mark.parametrize("folder", ["nfctl-certs", "deploy/keys"])
def test_gen_secrets_refuses_a_folder_in_the_repository(tmp_path: Path, folder: str) -> None:
    proc = run_gen_secrets(tmp_path, "--dir", folder)
    assert proc.returncode != 0
    assert "inside the repository" in proc.stderr
    assert not (REPO_ROOT / folder).exists()
