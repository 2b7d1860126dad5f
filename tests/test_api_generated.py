"""The generated gRPC code in nfctl/api matches protos/ (run `make protos` after editing)."""

from __future__ import annotations

from pathlib import Path

from nfctl.api.generate import OUT, generate


def test_generated_code_is_current(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*_pb2*")}
    committed = {
        p.relative_to(OUT): p.read_text()
        for p in OUT.rglob("*_pb2*")
        if "__pycache__" not in str(p)
    }
    assert fresh.keys() == committed.keys()
    stale = sorted(str(k) for k in fresh if fresh[k] != committed[k])
    assert not stale, f"stale generated files {stale}: run `make protos`"


def test_api_imports_and_describes_services() -> None:
    from nfctl.api.nfctl.v1 import nfctl_pb2

    services = set(nfctl_pb2.DESCRIPTOR.services_by_name)
    assert services == {"AgentService", "FleetService", "EnrollmentService"}
