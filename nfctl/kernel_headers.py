"""Make kernel headers visible to BCC at /lib/modules/$(uname -r)/{build,source}.

Cloud and VM kernels often ship without headers. BCC only needs headers close to the
running kernel's, so the nearest installed Debian headers are linked there:
build -> /usr/src/linux-headers-<v>-<arch>, source -> /usr/src/linux-headers-<v>-common.
Stdlib only: setup runs this before the virtualenv exists.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "ppc64le": "ppc64el"}


@dataclass(frozen=True)
class HeaderStatus:
    ok: bool
    build_dir: Path
    message: str
    fix: str | None = None


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path.name))


def _usable(build: Path) -> bool:
    return (build / "include" / "linux").is_dir() or (build / "Makefile").is_file()


def status(release: str | None = None, src_root: Path = Path("/usr/src")) -> HeaderStatus:
    release = release or platform.release()
    build = Path("/lib/modules") / release / "build"
    if _usable(build):
        target = os.path.realpath(build)
        return HeaderStatus(True, build, f"kernel headers found at {build} -> {target}")
    candidate = nearest_headers(release, src_root)
    arch = _DEBIAN_ARCH.get(platform.machine(), platform.machine())
    if candidate is None:
        return HeaderStatus(
            False,
            build,
            f"no kernel headers for {release} and none under {src_root}",
            fix=f"apt-get install linux-headers-{arch} (Debian/Ubuntu), then `nfctl doctor --fix`; "
            "elsewhere install your distribution's kernel headers package",
        )
    return HeaderStatus(
        False,
        build,
        f"no kernel headers at {build}; nearest installed: {candidate}",
        fix="run `nfctl doctor --fix` (or `make setup`) to link them",
    )


def nearest_headers(release: str, src_root: Path = Path("/usr/src")) -> Path | None:
    exact = src_root / f"linux-headers-{release}"
    if _usable(exact):
        return exact
    arch = _DEBIAN_ARCH.get(platform.machine(), platform.machine())
    candidates = sorted(
        (p for p in src_root.glob(f"linux-headers-*-{arch}") if _usable(p)), key=_version_key
    )
    if not candidates:
        return None
    wanted = _version_key(Path(release))[:2]
    not_newer = [c for c in candidates if _version_key(c)[:2] <= wanted]
    return (not_newer or candidates)[-1]


def link(release: str | None = None, src_root: Path = Path("/usr/src")) -> HeaderStatus:
    release = release or platform.release()
    current = status(release, src_root)
    if current.ok:
        return current
    build_src = nearest_headers(release, src_root)
    if build_src is None:
        return current
    modules = Path("/lib/modules") / release
    modules.mkdir(parents=True, exist_ok=True)
    _replace_symlink(modules / "build", build_src)
    arch = _DEBIAN_ARCH.get(platform.machine(), platform.machine())
    common = Path(str(build_src).removesuffix(f"-{arch}") + "-common")
    if common.is_dir():
        _replace_symlink(modules / "source", common)
    return HeaderStatus(
        True, modules / "build", f"linked {modules / 'build'} -> {build_src} (nearest headers)"
    )


def _replace_symlink(link_path: Path, target: Path) -> None:
    if link_path.is_symlink() or link_path.exists():
        if link_path.is_dir() and not link_path.is_symlink():
            raise OSError(f"{link_path} is a real directory; not replacing it")
        link_path.unlink()
    link_path.symlink_to(target)


def main() -> int:
    result = link() if "--link" in sys.argv else status()
    print(result.message if result.ok else f"{result.message}\n  fix: {result.fix}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
