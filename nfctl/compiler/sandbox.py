"""Confine the compile worker: NF sources are untrusted, and C has ways to read files at
compile time that no source scan can fully rule out (inline assembly `.incbin` built
through macro pasting, for one). The worker runs in its own mount and PID namespaces
(`unshare`), with a fresh /proc that shows only itself, and hides secrets before it
compiles: shadow files, home folders, SSH and Kubernetes credentials, and the agent's
own credential files. Folders the compile needs (the NF source, the Python environment)
are never hidden."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

SECRET_ENV = "NFCTL_WORKER_SECRETS"
DISABLE_ENV = "NFCTL_WORKER_SANDBOX"  # "0" turns the sandbox off (debugging only)
FALLBACK = "BCC_KERNEL_SOURCE"  # the image's fallback headers (nfctl.kernel_headers)

SECRET_FILES = [
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/security/opasswd",
]
SECRET_DIRS = [
    "/root",
    "/home",
    "/etc/ssh",
    "/etc/ssl/private",
    "/etc/kubernetes",
    "/etc/nfctl",
    "/var/lib/kubelet",
    "/var/lib/nfctl/tls",
    "/run/secrets",
    "/var/run/secrets",
    "/run/containerd",
    "/var/lib/containerd",
    "/var/lib/docker",
]

_extra_secrets: list[str] = []


def register_secret_paths(paths: list[str | Path | None]) -> None:
    """Credential files of this process (TLS keys, Git tokens) to hide from compiles."""
    for path in paths:
        if path:
            _extra_secrets.append(str(Path(path).resolve()))


def worker_prefix() -> list[str]:
    """`unshare` arguments for the worker, or [] where namespaces are not available."""
    if os.environ.get(DISABLE_ENV) == "0" or os.geteuid() != 0:
        return []
    binary = shutil.which("unshare")
    if binary is None:
        return []
    return [binary, "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc"]


def worker_env(base: dict[str, str]) -> dict[str, str]:
    """Only what the worker needs: no credentials leak through /proc/self/environ."""
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "VIRTUAL_ENV", "TMPDIR", DISABLE_ENV, FALLBACK)
    env = {k: v for k, v in base.items() if k in keep}
    env[SECRET_ENV] = json.dumps(_extra_secrets)
    env["HOME"] = "/nonexistent"
    return env


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount(
    libc: ctypes.CDLL,
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str | None = None,
) -> None:
    rc = libc.mount(
        source.encode() if source else None,
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _needed(paths: list[str]) -> list[str]:
    """Folders the compile must see, resolved."""
    import nfctl

    needed = [sys.prefix, sys.base_prefix, str(Path(nfctl.__file__).resolve().parents[1]), *paths]
    return [str(Path(p).resolve()) for p in needed if p]


def _contains(parent: str, child: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def confine(needed_paths: list[str]) -> list[str]:
    """Hide secrets in this process's mount namespace; returns what was hidden.

    Run inside `unshare --mount` (worker_prefix): mounts here never reach the host."""
    if os.environ.get(DISABLE_ENV) == "0":
        return []
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:  # already in our own namespace from unshare(1): fine
        log.debug("unshare(CLONE_NEWNS) failed: %s", os.strerror(ctypes.get_errno()))
    try:
        _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as exc:
        log.warning("compile sandbox unavailable (%s); compiling without it", exc)
        return []
    keep = _needed(needed_paths)
    try:
        extra = json.loads(os.environ.get(SECRET_ENV, "[]"))
    except ValueError:
        extra = []
    hidden = []
    for path in [*SECRET_FILES, *SECRET_DIRS, *extra]:
        if not os.path.lexists(path) or any(_contains(path, k) for k in keep):
            continue
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                _mount(libc, "tmpfs", path, "tmpfs", MS_RDONLY, "size=4k,mode=0555")
            else:
                _mount(libc, "/dev/null", os.path.realpath(path), None, MS_BIND)
                _mount(
                    libc, None, os.path.realpath(path), None, MS_BIND | MS_RDONLY | 32
                )  # MS_REMOUNT
            hidden.append(path)
        except OSError as exc:
            log.warning("cannot hide %s from the compiler: %s", path, exc)
    return hidden
