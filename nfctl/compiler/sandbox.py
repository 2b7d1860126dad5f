"""Confine the compile worker by allowlist: NF sources are untrusted, and C has ways to
read files at compile time that no source scan can fully rule out (include spellings,
links, `.incbin` built through macro pasting).

The worker starts in its own mount, PID and IPC namespaces (`unshare`; as non-root also
a user namespace, so `nfctl validate` in a user's CI is confined too). When its requests
arrive (a warm standby worker starts before they are known) it builds a fresh root: an
empty tmpfs holding, read-only, the repository snapshot the source guard read (written
from memory, so links and files the guard did not accept do not exist there), the kernel
headers, and the files Python, BCC and LLVM need; bpffs folders where it must pin; then
pivots into it. Nothing else of the host exists in its view. Anything that stops this
fails the compile: the only way around is the explicit, logged opt-out."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import shutil
import site
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

UNCONFINED_ENV = "NFCTL_UNCONFINED_COMPILE"  # "1": the user opted out (see allow_unconfined)
OPT_OUT_FLAG = "--unconfined-compile"

CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
O_PATH = 0o10000000
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added after the unification)
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

STAGING = "/tmp"  # where the new root is assembled, in the worker's own mount namespace
# The only writable folder (temporary files) besides pin folders: a path of its own, as
# /tmp may hold the repository snapshot.
SCRATCH = "/.nfctl-scratch"
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
# Public kernel facts BCC and libbpf read: possible CPUs (per-CPU maps), kernel BTF.
KERNEL_INFO = ("/sys/devices/system/cpu", "/sys/kernel/btf")
LOADER_FILES = ("/etc/ld.so.cache",)
# The image's fallback kernel headers (nfctl.kernel_headers), when the host has none.
FALLBACK = "BCC_KERNEL_SOURCE"


class ConfinementError(RuntimeError):
    """The compile confinement could not be set up: compiling is refused."""


_unconfined = False


def allow_unconfined(enabled: bool) -> None:
    """The user's explicit opt-out (`--unconfined-compile`), for machines without
    namespaces. Every worker started while it is on logs a warning."""
    global _unconfined
    _unconfined = enabled
    if enabled:
        log.warning(
            "%s: NF sources will be compiled WITHOUT confinement; a repository can then "
            "read any file this process can read",
            OPT_OUT_FLAG,
        )


def unconfined() -> bool:
    return _unconfined


def worker_prefix() -> list[str]:
    """The `unshare` command that starts the worker in its own namespaces."""
    if _unconfined:
        log.warning("compile worker starts UNCONFINED (%s)", OPT_OUT_FLAG)
        return []
    binary = shutil.which("unshare")
    if binary is None:
        raise ConfinementError(
            "cannot confine the compiler: `unshare` (util-linux) is not installed; "
            f"install it, or pass {OPT_OUT_FLAG} to compile without confinement"
        )
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return [
        binary,
        *user,
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--mount-proc",
        "--ipc",
        "--kill-child",
    ]


def worker_env(base: dict[str, str]) -> dict[str, str]:
    """Only what the worker needs: no credentials leak through /proc/self/environ."""
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "VIRTUAL_ENV", FALLBACK)
    env = {k: v for k, v in base.items() if k in keep}
    env["HOME"] = "/nonexistent"
    if _unconfined:
        env[UNCONFINED_ENV] = "1"
    return env


def explain_worker_failure(stderr: str) -> str | None:
    """A clear cause when the worker died setting up its namespaces."""
    for line in stderr.splitlines():
        if line.startswith("unshare:"):
            return (
                f"cannot confine the compiler ({line.strip()}): namespaces are not available "
                f"here; fix that, or pass {OPT_OUT_FLAG} to compile without confinement"
            )
    return None


# ---- the view: what the compiler may see (planned from facts, then applied) ----------------


@dataclass
class View:
    """The worker's whole file system, by absolute path."""

    files: dict[str, str] = field(default_factory=dict)  # written read-only from memory
    read_only: list[str] = field(default_factory=list)  # host paths bound read-only
    writable: list[str] = field(default_factory=list)  # bpffs folders bound read-write


def runtime_paths() -> list[str]:
    """What the running interpreter needs: its mapped files (Python, libbcc with LLVM,
    extension modules), the standard library and site-packages, and the nfctl package
    folder only (not the clone or venv it sits in)."""
    import nfctl

    paths = [str(Path(nfctl.__file__).resolve().parent), *LOADER_FILES]
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                paths.append(parts[5].strip())
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    for scheme_vars in ({}, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        found = sysconfig.get_paths(vars=scheme_vars)
        paths.extend(found[name] for name in names if name in found)
    paths.extend(site.getsitepackages())
    paths.extend(p for p in sys.path if p.endswith(("site-packages", "dist-packages", ".zip")))
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


def kernel_header_paths(release: str | None = None) -> list[str]:
    release = release or os.uname().release
    base = f"/lib/modules/{release}"
    paths = [f"{base}/{name}" for name in ("build", "source") if os.path.exists(f"{base}/{name}")]
    fallback = os.environ.get(FALLBACK)
    if fallback and os.path.isdir(fallback):
        paths.append(fallback)
    return paths


def plan_view(
    snapshots: dict[str, str], pin_dirs: list[str], runtime: list[str], headers: list[str]
) -> View:
    """The view for one batch: snapshots maps absolute path -> text of every repository
    file the guard accepted."""
    read_only = [*runtime, *headers, *DEVICES, *KERNEL_INFO]
    return View(
        files=dict(snapshots),
        read_only=[p for p in read_only if os.path.exists(p)],
        writable=list(dict.fromkeys(pin_dirs)),
    )


def _contains(parent: str, child: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


@dataclass
class _Plan:
    """Host facts gathered before the staging tmpfs covers anything."""

    symlinks: dict[str, str] = field(default_factory=dict)  # path -> link text
    binds: list[tuple[str, bool, bool]] = field(default_factory=list)  # real path, dir, rw
    fds: dict[str, int] = field(default_factory=dict)  # real path -> O_PATH fd


def _resolve_into(plan: _Plan, path: str, depth: int = 0) -> str:
    """The real path of path, recording every symlink on the way so that the view
    resolves it the same way (e.g. /lib -> usr/lib, build -> /usr/src/linux-headers-...)."""
    if depth > 40:
        raise ConfinementError(f"too many levels of symbolic links under {path}")
    current = "/"
    parts = [p for p in path.split("/") if p]
    for index, part in enumerate(parts):
        candidate = os.path.join(current, part)
        if os.path.islink(candidate):
            target = os.readlink(candidate)
            plan.symlinks.setdefault(candidate, target)
            resolved = os.path.normpath(os.path.join(current, target))
            rest = "/".join(parts[index + 1 :])
            return _resolve_into(
                plan, os.path.join(resolved, rest) if rest else resolved, depth + 1
            )
        current = candidate
    return current


def _gather(view: View) -> _Plan:
    plan = _Plan()
    bound: list[str] = []
    for rw, paths in ((False, view.read_only), (True, view.writable)):
        for path in sorted(paths, key=len):  # a folder before what it holds
            real = _resolve_into(plan, path)
            if any(_contains(b, real) for b in bound):
                continue  # already visible through a bound folder
            bound.append(real)
            plan.binds.append((real, os.path.isdir(real), rw))
    for file_path in view.files:
        for real, _, _ in plan.binds:
            if _contains(real, file_path) or _contains(file_path, real):
                raise ConfinementError(
                    f"the repository file {file_path} overlaps {real}, which the compiler "
                    "sees from the host: move the repository elsewhere"
                )
    plan.symlinks = {
        link: target
        for link, target in plan.symlinks.items()
        if not any(_contains(real, link) for real, _, _ in plan.binds)
    }
    for real, _, _ in plan.binds:
        plan.fds[real] = os.open(real, O_PATH | os.O_CLOEXEC)
    return plan


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise ConfinementError(f"{what}: {os.strerror(err)}")


def _mount(libc: ctypes.CDLL, source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:  # fmt: skip
    rc = libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(rc, f"mount {source or fstype or ''} on {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def enter(view: View) -> None:
    """Replace this process's file system by view. Must run in its own mount namespace
    (worker_prefix); raises ConfinementError when any step fails."""
    arch = platform.machine()
    if arch not in SYS_PIVOT_ROOT:
        raise ConfinementError(f"no pivot_root syscall number known for {arch}")
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    try:
        plan = _gather(view)
    except OSError as exc:
        raise ConfinementError(f"cannot prepare the compiler's view: {exc}") from exc
    try:
        _build(libc, view, plan)
    finally:
        for fd in plan.fds.values():
            os.close(fd)
    os.chdir(STAGING)
    _check(libc.syscall(SYS_PIVOT_ROOT[arch], b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")
    os.environ["TMPDIR"] = SCRATCH
    tempfile.tempdir = SCRATCH


def _build(libc: ctypes.CDLL, view: View, plan: _Plan) -> None:
    root = STAGING
    _mount(libc, "tmpfs", root, "tmpfs", 0, "size=64m,mode=0755")
    for real, is_dir, _ in plan.binds:
        target = root + real
        os.makedirs(target if is_dir else os.path.dirname(target), exist_ok=True)
        if not is_dir:
            with open(target, "a", encoding="utf-8"):
                pass
    os.makedirs(root + SCRATCH)
    for link, text in plan.symlinks.items():
        os.makedirs(os.path.dirname(root + link), exist_ok=True)
        if not os.path.lexists(root + link):
            os.symlink(text, root + link)
    for path, text in view.files.items():
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        with open(root + path, "w", encoding="utf-8") as out:
            out.write(text)
    for real, _, rw in plan.binds:
        if not rw:
            _mount(libc, f"/proc/self/fd/{plan.fds[real]}", root + real, None, MS_BIND | MS_REC)
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    rc = libc.syscall(
        SYS_MOUNT_SETATTR, AT_FDCWD, root.encode(), AT_RECURSIVE, ctypes.byref(attr),
        ctypes.sizeof(attr),
    )  # fmt: skip
    _check(rc, "make the compiler's view read-only")
    for real, _, rw in plan.binds:
        if rw:
            _mount(libc, f"/proc/self/fd/{plan.fds[real]}", root + real, None, MS_BIND)
    _mount(libc, "tmpfs", root + SCRATCH, "tmpfs", 0, "size=16m,mode=1777")
