"""Regenerate nfctl/api from protos/ (`make protos`); tests check the result is current."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "protos"
OUT = REPO / "nfctl" / "api"


def generate(out: Path = OUT) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent  # mypy-protobuf's plugins live next to python
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in out.rglob("*_pb2*.py*"):
        text = path.read_text()
        # generated modules import each other as top-level `nfctl.v1...`: make them relative
        fixed = re.sub(
            r"^from nfctl\.v1 import", "from nfctl.api.nfctl.v1 import", text, flags=re.M
        )
        if fixed != text:
            path.write_text(fixed)
        written.append(path)
    for folder in {p.parent for p in written}:
        while folder != out:
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text("")
            folder = folder.parent
    return sorted(written)


if __name__ == "__main__":
    for path in generate():
        print(path.relative_to(REPO))
    sys.exit(0)
