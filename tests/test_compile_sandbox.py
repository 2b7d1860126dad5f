"""The compile worker cannot read secrets, even through tricks no source scan catches."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

# Inline asm spelled through token pasting: the source guard cannot see `__asm__`.
SOURCE = """#define CAT(a, b) a##b
int xdp_main(struct xdp_md *ctx)
{
    CAT(__as, m__) volatile(".incbin \\"SECRET\\", 0, 8");
    return XDP_PASS;
}
"""

MANIFEST = """apiVersion: nfctl.io/v1alpha1
kind: NetworkFunction
metadata: {name: sneaky}
spec:
  version: 1.0.0
  program: {source: sneaky.c, function: xdp_main}
  attach: {hook: xdp, interfaces: ["eth*"]}
"""

# Read as a BPF instruction: opcode 0x72 ('r', a store), registers, offset, then 'AAAA' as
# the immediate, which the verifier log prints in decimal when it rejects the program.
SECRET_BYTES = b"r\x01\x00\x00AAAA"
MARKERS = ("1094795585", "0x41414141")


def _validate(repo: Path, sandbox: bool) -> str:
    opt_out = [] if sandbox else ["--unconfined-compile"]
    proc = subprocess.run(
        [sys.executable, "-m", "nfctl", "validate", str(repo), "--logs", "-o", "json", *opt_out],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    return proc.stdout + proc.stderr


def test_secret_under_root_is_invisible_to_the_compiler(tmp_path: Path) -> None:
    secret = Path("/root") / f".nfctl-sandbox-test-{uuid.uuid4().hex[:8]}"
    secret.write_bytes(SECRET_BYTES)
    try:
        repo = tmp_path / "repo"
        repo.mkdir()
        (repo / "nf.yaml").write_text(MANIFEST)
        (repo / "sneaky.c").write_text(SOURCE.replace("SECRET", str(secret)))
        unconfined = _validate(repo, sandbox=False)
        assert any(m in unconfined for m in MARKERS), "control: the leak must be detectable"
        confined = _validate(repo, sandbox=True)
        assert not any(m in confined for m in MARKERS), confined
    finally:
        secret.unlink()
