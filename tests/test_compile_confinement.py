"""The compiler reads nothing outside the repository snapshot, kernel headers and its own
runtime: each attack is shown to fail at the source guard (located error, no secret text)
and, with the guard bypassed, at the allowlisted view alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfctl.compiler import sandbox
from nfctl.compiler.build import BuildRequest, BuildResult
from nfctl.compiler.client import run_worker

pytestmark = pytest.mark.kernel

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET_TEXT = "nfctl_confinement_secret_7f3a91"

MANIFEST = """apiVersion: nfctl.io/v1alpha1
kind: NetworkFunction
metadata: {name: sneaky}
spec:
  version: 1.0.0
  program: {source: sneaky.c, function: xdp_main}
  attach: {hook: xdp, interfaces: ["eth*"]}
"""
BODY = "int xdp_main(struct xdp_md *ctx)\n{\n    return XDP_PASS;\n}\n"

# Ways to spell an include of TARGET on line 2 that clang accepts (line 1 is `int a;`).
INCLUDE_VARIANTS = {
    "cr-line-end": 'int a;\r#include "TARGET"\n',
    "crlf-line-end": 'int a;\r\n#include "TARGET"\r\n',
    "form-feed": 'int a;\n\f#include "TARGET"\n',
    "vertical-tab": 'int a;\n\v#include "TARGET"\n',
    "digraph": 'int a;\n%:include "TARGET"\n',
    "splice": 'int a;\n#\\\ninclude "TARGET"\n',
    "splice-cr": 'int a;\n#\\\rinclude "TARGET"\n',
    "splice-space": 'int a;\n#\\ \ninclude "TARGET"\n',
    "comment-inside": 'int a;\n# /* c */ include "TARGET"\n',
    "trigraph": 'int a;\n??=include "TARGET"\n',
}


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A folder every user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="nfctl-confine-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def write_secret(path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    path.chmod(mode)
    return path


def write_nf(repo: Path, source: str) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "nf.yaml").write_text(MANIFEST)
    (repo / "sneaky.c").write_bytes(source.encode())
    for path in (repo, repo / "nf.yaml", repo / "sneaky.c"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return repo


def _user_namespaces_refused(user: str) -> bool:
    """The kernel refuses user namespaces to some processes (e.g. chrooted ones)."""
    drop = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    proc = subprocess.run([*drop, "unshare", "--user", "true"], capture_output=True, check=False)
    return proc.returncode != 0


def _reachable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


def as_user(user: str, python_args: list[str]) -> tuple[list[str], Path | None]:
    """Run this venv's Python with python_args as user. When the clone is not reachable by
    other users (it lives under /root, as on a fresh machine), the project is bind-mounted
    onto a folder they can enter, in a mount namespace of the command's own. Returns the
    command and that folder (the caller removes it)."""
    drop = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
    if _reachable_by_others(REPO_ROOT):
        return [*drop, sys.executable, *python_args], None
    mountpoint = Path(tempfile.mkdtemp(prefix="nfctl-project-"))
    mountpoint.chmod(0o755)
    python = mountpoint / Path(sys.executable).relative_to(REPO_ROOT)
    script = 'mount --bind "$0" "$1" && shift && exec "$@"'
    command = [
        *("unshare", "--mount", "--propagation", "private", "sh", "-c", script),
        *(str(REPO_ROOT), str(mountpoint)),
        *("env", f"PYTHONPATH={mountpoint}", *drop, str(python), *python_args),
    ]
    return command, mountpoint


def validate(
    repo: Path, *args: str, env: dict[str, str] | None = None, user: str | None = None
) -> subprocess.CompletedProcess[str]:
    python_args = ["-m", "nfctl", "validate", str(repo), "--logs", "-o", "json", *args]
    command, mountpoint = [sys.executable, *python_args], None
    if user:
        command, mountpoint = as_user(user, python_args)
    try:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=env or dict(os.environ),
            timeout=300,
            cwd="/" if user else REPO_ROOT,
            check=False,
        )
    finally:
        if mountpoint is not None:
            mountpoint.rmdir()


def report_errors(proc: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    report = json.loads(proc.stdout)
    errors: list[dict[str, object]] = list(report["errors"])
    for nf in report["functions"]:
        errors.extend(nf["errors"])
    return errors


# ---- the source guard refuses every spelling, at file:line, quoting nothing -----------------


@pytest.mark.parametrize("variant", sorted(INCLUDE_VARIANTS))
def test_guard_refuses_include_variants(variant: str, tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "secret.h", f"int {SECRET_TEXT} = ;\n")
    repo = write_nf(tmp_path / "repo", INCLUDE_VARIANTS[variant].replace("TARGET", str(secret)))
    proc = validate(repo)
    assert SECRET_TEXT not in proc.stdout + proc.stderr
    errors = report_errors(proc)
    assert any(
        e["file"] == "sneaky.c" and e.get("line") == 2 and "#include" in str(e["message"])
        for e in errors
    ), errors


def test_guard_refuses_hard_link_to_root_only_file(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "shadow", f"root:{SECRET_TEXT}:19000:0:99999:7:::\n")
    repo = write_nf(tmp_path / "repo", 'int a;\n#include "inc.h"\n' + BODY)
    os.link(secret, repo / "inc.h")
    proc = validate(repo)
    assert SECRET_TEXT not in proc.stdout + proc.stderr
    errors = report_errors(proc)
    assert any(
        e["file"] == "sneaky.c" and e.get("line") == 2 and "hard link" in str(e["message"])
        for e in errors
    ), errors


# ---- with the guard bypassed, the allowlisted view alone stops the read ---------------------


def raw_request(name: str, repo: Path, source: str) -> BuildRequest:
    """A build request as the worker receives it, without the source guard's checks."""
    return BuildRequest(
        nf=name,
        hook="xdp",
        function="xdp_main",
        cflags=[],
        source_rel="sneaky.c",
        source_text=source + BODY,
        quote_dir=str(repo),
        build_hash=uuid.uuid4().hex * 2,
        repo_root=str(repo),
    )


def read_secret(result: BuildResult) -> bool:
    """clang located a message in a file outside the snapshot (named by an absolute path
    or one leaving the repository) or in the hard link: it opened and read it."""
    return any(d.file == "linked.h" or d.file.startswith(("/", "../")) for d in result.diagnostics)


def run_batch(requests: list[BuildRequest], confined: bool) -> list[BuildResult]:
    sandbox.allow_unconfined(not confined)
    try:
        return run_worker(requests)
    finally:
        sandbox.allow_unconfined(False)


def test_view_alone_stops_every_include_form(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "secret.h", f"int {SECRET_TEXT} = ;\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    os.link(secret, repo / "linked.h")
    # (BCC compiles with trigraphs off: `??=include` is only the guard's concern)
    sources = {
        name: text.replace("TARGET", str(secret))
        for name, text in INCLUDE_VARIANTS.items()
        if name != "trigraph"
    }
    sources["absolute"] = f'#include "{secret}"\n'
    sources["parent"] = '#include "../secret.h"\n'
    sources["proc-root"] = f'#include "/proc/self/root{secret}"\n'
    # more ".." than the cwd is deep: whether clang resolves them lexically or the kernel
    # does, the path then lands on the secret
    up = "/.." * (len(Path.cwd().parts) + 3)
    sources["proc-cwd"] = f'#include "/proc/self/cwd{up}{secret}"\n'
    sources["hard-link"] = '#include "linked.h"\n'
    requests = [raw_request(name, repo, text) for name, text in sources.items()]

    unconfined = run_batch(requests, confined=False)
    assert {r.nf for r in unconfined if read_secret(r)} == set(sources), "control"
    # even then, diagnostics name the file but quote none of its text
    assert not any(SECRET_TEXT in json.dumps(r.to_json()) for r in unconfined)

    confined = run_batch(requests, confined=True)
    for result in confined:
        shown = json.dumps(result.to_json())
        assert SECRET_TEXT not in shown, shown
        assert not read_secret(result), shown
        assert any("not found" in d.message for d in result.diagnostics), shown


# ---- .incbin through token pasting: invisible to any source scan ----------------------------

# Read as a BPF instruction: opcode 0x72 ('r', a store), registers, offset, then 'AAAA' as
# the immediate, which the verifier log prints in decimal when it rejects the program.
SECRET_BYTES = b"r\x01\x00\x00AAAA"
MARKERS = ("1094795585", "0x41414141")
INCBIN = """#define CAT(a, b) a##b
int xdp_main(struct xdp_md *ctx)
{
    CAT(__as, m__) volatile(".incbin \\"SECRET\\", OFFSET, 8");
    return XDP_PASS;
}
"""


def incbin_repo(repo: Path, secret: Path, offset: int = 0) -> Path:
    source = INCBIN.replace("SECRET", str(secret)).replace("OFFSET", str(offset))
    return write_nf(repo, source)


def leaks(proc: subprocess.CompletedProcess[str]) -> bool:
    return any(m in proc.stdout + proc.stderr for m in MARKERS)


def test_agent_credentials_are_invisible_to_the_compiler(tmp_path: Path) -> None:
    state = tmp_path / "state"
    tls_key = write_secret(state / "tls" / "node.key", SECRET_BYTES)
    prefix = b'[remote "origin"]\n\turl = https://nfctl:'
    mirror_config = write_secret(
        state / "git" / "mirror.git" / "config", prefix + SECRET_BYTES + b"@git.example/nfs\n"
    )
    for secret, offset in ((tls_key, 0), (mirror_config, len(prefix))):
        repo = incbin_repo(tmp_path / f"repo-{secret.name}", secret, offset)
        assert leaks(validate(repo, "--unconfined-compile")), "control: the read is detectable"
        proc = validate(repo)
        assert not leaks(proc), proc.stdout


def test_secret_beside_the_clone_and_venv_is_invisible(tmp_path: Path) -> None:
    """The /root layout: the clone (so the nfctl package) lives in a folder that also holds
    secrets; only the package folder itself may be visible."""
    home = tmp_path / "home"
    clone = home / "nfctl"
    shutil.copytree(
        REPO_ROOT / "nfctl", clone / "nfctl", ignore=shutil.ignore_patterns("__pycache__")
    )
    in_clone = write_secret(clone / ".git-credentials", SECRET_BYTES)
    in_home = write_secret(home / ".ssh" / "id_ed25519", SECRET_BYTES)
    env = dict(os.environ, PYTHONPATH=str(clone))
    probe = subprocess.run(
        [sys.executable, "-c", "import nfctl; print(nfctl.__file__)"],
        env=env,
        cwd=clone,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == str(clone / "nfctl" / "__init__.py")
    for secret in (in_clone, in_home):
        repo = incbin_repo(home / f"repo-{secret.name}", secret)
        assert leaks(validate(repo, "--unconfined-compile", env=env)), "control"
        proc = validate(repo, env=env)
        assert not leaks(proc), proc.stdout


# ---- fail closed; the opt-out is explicit and loud -------------------------------------------


def test_without_namespaces_compiling_is_refused_unless_opted_out(tmp_path: Path) -> None:
    repo = tmp_path / "blocklist"
    shutil.copytree(REPO_ROOT / "bpf" / "blocklist", repo)
    no_tools = tmp_path / "empty-path"
    no_tools.mkdir()
    env = dict(os.environ, PATH=str(no_tools))  # no `unshare`: no namespaces
    proc = validate(repo, env=env)
    assert proc.returncode == 1
    messages = [str(e["message"]) for e in report_errors(proc)]
    assert any(
        "compiling refused" in m and "unshare" in m and "--unconfined-compile" in m
        for m in messages
    ), messages

    opted_out = validate(repo, "--unconfined-compile", env=env)
    assert opted_out.returncode == 0, opted_out.stdout
    assert "WITHOUT confinement" in opted_out.stderr


# ---- unprivileged: a user's CI is confined too ---------------------------------------------

UNPRIVILEGED_PROBE = """
import json, sys
from nfctl.compiler import sandbox
from nfctl.compiler.build import BuildRequest
from nfctl.compiler.client import run_worker
repo, secret, confined = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
sandbox.allow_unconfined(not confined)
request = BuildRequest(
    nf="probe", hook="xdp", function="xdp_main", cflags=[], source_rel="sneaky.c",
    source_text='#include "' + secret + '"\\nint xdp_main(struct xdp_md *ctx) { return 2; }\\n',
    quote_dir=repo, build_hash="0" * 64, repo_root=repo,
)
[result] = run_worker([request])
print(json.dumps(result.to_json()))
"""


def test_unprivileged_compile_is_confined(world_dir: Path) -> None:
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed to run as nobody"
    secret = write_secret(world_dir / "notes.h", f"int {SECRET_TEXT} = ;\n", mode=0o644)
    repo = write_nf(world_dir / "repo", BODY)

    def probe(confined: bool) -> dict[str, object]:
        command, mountpoint = as_user(
            "65534",
            ["-c", UNPRIVILEGED_PROBE, str(repo), str(secret), "1" if confined else "0"],
        )
        try:
            proc = subprocess.run(
                command, capture_output=True, text=True, timeout=300, cwd="/", check=True
            )
        finally:
            if mountpoint is not None:
                mountpoint.rmdir()
        result: dict[str, object] = json.loads(proc.stdout)
        return result

    def files(result: dict[str, object]) -> list[object]:
        diagnostics = result["diagnostics"]
        assert isinstance(diagnostics, list)
        return [d["file"] for d in diagnostics]

    assert str(secret) in files(probe(confined=False)), "control: nobody can read it"
    confined = probe(confined=True)
    assert str(secret) not in files(confined) and SECRET_TEXT not in json.dumps(confined)
    if _user_namespaces_refused("65534"):
        # the kernel refuses user namespaces here (to a chrooted process, as in a fresh-root
        # test run): then the compile must be refused, with the way out named, never run
        # unconfined
        assert confined["ok"] is False and "--unconfined-compile" in json.dumps(confined)
        return
    assert "not found" in json.dumps(confined), confined

    proc = validate(repo, user="65534")
    warnings = json.loads(proc.stdout)["warnings"]
    assert any("not running as root" in w["message"] for w in warnings), warnings
