"""`nfctl doctor`: can this machine compile, load and attach eBPF network functions?"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from nfctl import kernel_headers
from nfctl.system import bcc_version, kernel_release

CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}
BPFFS = Path("/sys/fs/bpf")


@dataclass
class Check:
    name: str
    ok: bool
    message: str
    fix: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_capabilities() -> Check:
    caps = _effective_caps()
    missing = [name for name, bit in CAPABILITIES.items() if not caps & (1 << bit)]
    if missing:
        return Check(
            "capabilities",
            False,
            f"missing {', '.join(missing)}",
            fix="run as root, or grant CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON",
        )
    return Check("capabilities", True, "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_PERFMON")


def check_bpf_syscall() -> Check:
    from nfctl.bpf import syscall

    try:
        fd = syscall.map_create(2, 4, 8, 1, name="nfctl_doctor")
    except OSError as exc:
        return Check(
            "bpf-syscall",
            False,
            f"bpf(BPF_MAP_CREATE) failed: {exc}",
            fix="run as root; check kernel.unprivileged_bpf_disabled and seccomp/LSM policy",
        )
    os.close(fd)
    return Check("bpf-syscall", True, "bpf() works")


def bpffs_mounted(path: Path = BPFFS) -> bool:
    from nfctl.bpf.syscall import BPF_FS_MAGIC, fs_type

    try:
        return fs_type(path) == BPF_FS_MAGIC
    except OSError:
        return False


def check_bpffs() -> Check:
    if bpffs_mounted():
        return Check("bpffs", True, f"bpffs mounted at {BPFFS}")
    return Check(
        "bpffs",
        False,
        f"no bpffs at {BPFFS}: pinned programs and maps cannot outlive the agent",
        fix=f"mount -t bpf bpf {BPFFS} (or `nfctl doctor --fix`)",
    )


def check_btf() -> Check:
    if Path("/sys/kernel/btf/vmlinux").exists():
        return Check("btf", True, "kernel BTF at /sys/kernel/btf/vmlinux")
    return Check(
        "btf",
        False,
        "no kernel BTF: verifier messages lose detail",
        fix="use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    )


def check_headers() -> Check:
    st = kernel_headers.activate()  # the compile check below then uses the same headers
    return Check("kernel-headers", st.ok, st.message, fix=None if st.ok else st.fix)


def check_bcc_compile() -> Check:
    """Compile and verifier-check a tiny XDP and TC program through the real worker."""
    from nfctl.compiler.build import BuildRequest
    from nfctl.compiler.client import run_worker

    version = bcc_version()
    if version == "missing":
        return Check(
            "bcc",
            False,
            "BCC's Python module is not importable",
            fix="apt-get install python3-bpfcc; use a venv made with --system-site-packages",
        )
    requests = [
        BuildRequest(
            nf=f"doctor-{hook}",
            hook=hook,
            function="doctor_nf",
            cflags=[],
            source_rel="doctor.c",
            source_text=f"int doctor_nf({ctx} *ctx) {{ return {verdict}; }}\n",
            quote_dir="",
            build_hash="d0c70r" + "0" * 58,
        )
        for hook, ctx, verdict in (
            ("xdp", "struct xdp_md", "XDP_PASS"),
            ("tc-ingress", "struct __sk_buff", "TC_ACT_OK"),
        )
    ]
    results = run_worker(requests, timeout=120)
    failed = [r for r in results if not r.ok]
    if failed:
        message = "; ".join(str(d) for r in failed for d in r.diagnostics)[:800]
        return Check(
            "bcc",
            False,
            f"BCC {version} could not compile and load a test program: {message}",
            fix="check the kernel-headers result above; then `make setup`",
        )
    seconds = max(r.compile_seconds + r.load_seconds for r in results)
    return Check(
        "bcc", True, f"BCC {version} compiled and loaded XDP and TC programs ({seconds:.2f}s)"
    )


def check_netlink_hooks() -> Check:
    """clsact qdisc and XDP attach on a veth pair in a throwaway network namespace."""
    from nfctl.hookprobe import probe_hooks

    try:
        message = probe_hooks()
    except Exception as exc:
        return Check(
            "xdp-tc",
            False,
            f"cannot attach at XDP/TC: {exc}",
            fix="needs root, network namespaces, the veth and sch_clsact modules",
        )
    return Check("xdp-tc", True, message)


def check_links() -> Check:
    """Which bpf_link attachments this kernel has (probed, not read off the version)."""
    from nfctl.datapath import links

    tcx, xdp_links = links.kernel_has_tcx(), links.kernel_has_xdp_links()
    if tcx and xdp_links:
        return Check("bpf-links", True, "TCX and XDP links: nfctl attaches through pinned links")
    return Check(
        "bpf-links",
        True,
        f"TCX {'yes' if tcx else 'no'}, XDP links {'yes' if xdp_links else 'no'}: "
        "nfctl falls back to netlink (cls_bpf filters, netlink XDP) where links are missing",
    )


def check_shadowing() -> Check:
    """Programs of other tools that run before nfctl's chain on this machine's hooks."""
    from pyroute2 import IPRoute

    from nfctl.datapath.shadowscan import scan

    with IPRoute() as handle:
        findings = scan(handle)
    ahead = [f for f in findings if f.ours_attached]
    if ahead:
        return Check(
            "shadowing",
            False,
            "; ".join(f.describe() for f in ahead),
            fix=(
                "let nfctl's TCX link run first (attach.position: first, the default) and "
                "drop any cls_bpf attachment of nfctl behind TCX (unset NFCTL_ATTACH=netlink); "
                "for XDP, only one program can hold an interface"
            ),
        )
    others = "; ".join(f.describe() for f in findings)
    return Check("shadowing", True, others or "no other tool's program runs before nfctl's")


ALL_CHECKS: list[Callable[[], Check]] = [
    check_capabilities,
    check_bpf_syscall,
    check_bpffs,
    check_btf,
    check_headers,
    check_bcc_compile,
    check_netlink_hooks,
    check_links,
    check_shadowing,
]


def run_checks() -> list[Check]:
    checks = []
    for fn in ALL_CHECKS:
        try:
            checks.append(fn())
        except Exception as exc:  # a check that crashes is a failed check, not a traceback
            checks.append(Check(fn.__name__.removeprefix("check_"), False, f"check crashed: {exc}"))
    return checks


def apply_fixes() -> list[str]:
    """What doctor --fix can repair safely: kernel header links and the bpffs mount."""
    done = []
    st = kernel_headers.link()
    done.append(st.message)
    if not bpffs_mounted():
        proc = subprocess.run(
            ["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True, text=True, check=False
        )
        done.append(
            f"mounted bpffs at {BPFFS}" if proc.returncode == 0 else f"mount failed: {proc.stderr}"
        )
    return done


def summary() -> dict[str, str]:
    return {"kernel": kernel_release(), "bcc": bcc_version()}


# -- preflight (the agent pod's init container) ---------------------------------------------

ADVISORY = {"btf"}  # degrades messages only: never a reason to keep the agent from starting


def blocking_failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.ok and c.name not in ADVISORY]


def cannot_run_message(failures: list[Check]) -> str:
    parts = [f"{c.name}: {c.message}" + (f" (fix: {c.fix})" if c.fix else "") for c in failures]
    return "this node cannot run NFs: " + "; ".join(parts)


def pod_event(pod: str, namespace: str, uid: str, node: str, message: str) -> dict[str, object]:
    """A core/v1 Event on the agent's pod, as `kubectl describe pod` and `kubectl get
    events` show them."""
    import datetime

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{pod}.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod,
            "namespace": namespace,
            "uid": uid,
            "fieldPath": "spec.initContainers{preflight}",
        },
        "reason": "NodeCannotRunNFs",
        "message": message[:1024],
        "type": "Warning",
        "source": {"component": "nfctl-doctor", "host": node},
        "reportingComponent": "nfctl.io/doctor",
        "reportingInstance": node,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
