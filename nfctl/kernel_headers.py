"""Make kernel headers visible to BCC at /lib/modules/$(uname -r)/{build,source}.

Cloud and VM kernels often ship without headers. BCC only needs headers close to the
running kernel's, so the nearest installed Debian headers are linked there:
build -> /usr/src/linux-headers-<v>-<arch>, source -> /usr/src/linux-headers-<v>-common.

Where the host has none (managed node images), the container image carries a fallback: one
merged header tree (`--make-fallback`) that BCC is pointed at with BCC_KERNEL_SOURCE, since a
pod cannot write the host's read-only /lib/modules.
Stdlib only: setup runs this before the virtualenv exists.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

FALLBACK_ENV = "NFCTL_FALLBACK_HEADERS"
DEFAULT_FALLBACK = Path("/opt/nfctl/kernel-headers")
BCC_SOURCE_ENV = "BCC_KERNEL_SOURCE"
_KERNEL_ARCH = {"x86_64": "x86", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "powerpc"}
_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "ppc64le": "ppc64el"}


@dataclass(frozen=True)
class HeaderStatus:
    ok: bool
    build_dir: Path
    message: str
    fix: str | None = None
    fallback: bool = False


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


def fallback_dir() -> Path:
    return Path(os.environ.get(FALLBACK_ENV) or DEFAULT_FALLBACK)


def resolve(release: str | None = None) -> HeaderStatus:
    """The headers a compile will use: the host's, else the image's fallback tree."""
    release = release or platform.release()
    host = status(release)
    if host.ok:
        return host
    fallback = fallback_dir()
    if _usable(fallback):
        made_for = (
            (fallback / "nfctl-headers-release").read_text().strip()
            if (fallback / "nfctl-headers-release").is_file()
            else "unknown"
        )
        return HeaderStatus(
            True,
            fallback,
            f"host has no kernel headers for {release}; using the image's fallback headers "
            f"{made_for} at {fallback} (programs that read kernel structs may not match)",
            fix="install the host's kernel headers package for exact headers",
            fallback=True,
        )
    return host


def activate(release: str | None = None) -> HeaderStatus:
    """Resolve, and point BCC (in this process and the compile workers it starts) at the
    fallback tree when the host has no headers."""
    result = resolve(release)
    if result.fallback:
        os.environ[BCC_SOURCE_ENV] = str(result.build_dir)
    return result


def make_fallback(dest: Path, src_root: Path = Path("/usr/src")) -> Path:
    """Merge the installed Debian headers (<v>-common, then <v>-<arch> over it) into one tree
    at dest, keeping only this machine's architecture: the form BCC_KERNEL_SOURCE needs."""
    arch = _DEBIAN_ARCH.get(platform.machine(), platform.machine())
    candidates = sorted(
        (p for p in src_root.glob(f"linux-headers-*-{arch}") if _usable(p)), key=_version_key
    )
    if not candidates:
        raise FileNotFoundError(f"no linux-headers-*-{arch} under {src_root}")
    build = candidates[-1]
    common = Path(str(build).removesuffix(f"-{arch}") + "-common")
    karch = _KERNEL_ARCH.get(platform.machine(), platform.machine())
    for tree in (common, build):
        if tree.is_dir():
            shutil.copytree(
                tree,
                dest,
                symlinks=True,
                dirs_exist_ok=True,
                ignore=lambda d, names, t=tree: _other_arches(Path(d), names, t, karch),
            )
    (dest / "nfctl-headers-release").write_text(build.name.removeprefix("linux-headers-") + "\n")
    return dest


def _other_arches(folder: Path, names: list[str], tree: Path, keep: str) -> list[str]:
    if folder == tree:  # build tooling (links into linux-kbuild): BCC needs none of it
        return [n for n in names if n in ("scripts", "tools")]
    if folder == tree / "arch":
        return [n for n in names if n != keep]
    return []


def main() -> int:
    if "--make-fallback" in sys.argv:
        dest = Path(sys.argv[sys.argv.index("--make-fallback") + 1])
        print(f"fallback kernel headers at {make_fallback(dest)}")
        return 0
    result = link() if "--link" in sys.argv else resolve()
    print(result.message if result.ok else f"{result.message}\n  fix: {result.fix}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
