"""Where nfctl pins things: one folder tree under one bpffs root.

<root>/xdp/{chain,cursor,heads}          XDP chain prog array, per-CPU cursor, heads
<root>/xdp/heads-index                   the heads of small ifindexes again, as an array
<root>/xdp/{counters,slotctr,counter-ids} per-NF verdict counters (nfctl.datapath.counters)
<root>/xdp/dispatcher-<build>            the XDP dispatcher program
<root>/tc/{chain,cursor,heads}           same for TC (ingress and egress share them)
<root>/tc/dispatcher-<hook>-<build>
<root>/nfs/<nf>/maps/<map>               NF maps: stable across program versions
<root>/nfs/<nf>/progs/<build hash>       loaded NF program versions
<root>/nfs/<nf>/staging/<tag>/<map>      maps being migrated or recreated
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from nfctl.datapath.counters import CounterPins
from nfctl.manifest.model import Hook

DEFAULT_BPFFS_ROOT = Path("/sys/fs/bpf/nfctl")


class NoBpffsError(OSError):
    """The pin root is not on a bpf filesystem: nothing pinned there could be kept or found."""


def pin_root_fs(root: Path) -> str:
    """The filesystem the pin root is on (its nearest existing folder's): "bpf" when
    pins made under it reach the kernel."""
    from nfctl.bpf.syscall import FS_MAGIC_NAMES, fs_type

    here = Path(os.path.abspath(root))
    while not here.exists() and here != here.parent:
        here = here.parent
    magic = fs_type(here)
    return FS_MAGIC_NAMES.get(magic, f"magic {magic:#x}")


def require_bpffs(root: Path) -> None:
    """Refuse a pin root outside bpffs before anything is attached: the agent would load and
    attach programs it can neither pin nor find again."""
    kind = pin_root_fs(root)
    if kind != "bpf":
        raise NoBpffsError(
            f"{root} is not on a bpffs mount (its filesystem: {kind}): pinned "
            "programs, links and maps can be neither kept nor found. Mount it (`mount -t bpf "
            "bpf /sys/fs/bpf`, or `nfctl doctor --fix`); `ip netns exec` mounts a /sys "
            "without it, so enter only the network namespace (`nsenter --net=/run/netns/NAME`)"
        )


def hook_kind(hook: Hook) -> str:
    return "xdp" if hook is Hook.XDP else "tc"


@dataclass(frozen=True)
class BpffsPaths:
    root: Path

    def kind_dir(self, kind: str) -> Path:
        return self.root / kind

    def chain(self, kind: str) -> Path:
        return self.kind_dir(kind) / "chain"

    def cursor(self, kind: str) -> Path:
        return self.kind_dir(kind) / "cursor"

    def heads(self, kind: str) -> Path:
        return self.kind_dir(kind) / "heads"

    def heads_index(self, kind: str) -> Path:
        return self.kind_dir(kind) / "heads-index"

    def counter_pins(self, kind: str) -> CounterPins:
        folder = self.kind_dir(kind)
        return CounterPins(folder / "counters", folder / "slotctr", folder / "counter-ids")

    def dispatcher_prefix(self, hook: Hook) -> str:
        return "dispatcher-" if hook is Hook.XDP else f"dispatcher-{hook.value}-"

    def dispatcher(self, hook: Hook, build: str) -> Path:
        return self.kind_dir(hook_kind(hook)) / f"{self.dispatcher_prefix(hook)}{build[:16]}"

    def dispatchers(self, hook: Hook) -> list[Path]:
        folder = self.kind_dir(hook_kind(hook))
        if not folder.is_dir():
            return []
        prefix = self.dispatcher_prefix(hook)
        return sorted(
            p
            for p in folder.iterdir()
            if p.name.startswith(prefix) and (hook is not Hook.XDP or p.name.count("-") == 1)
        )

    def nfs_dir(self) -> Path:
        return self.root / "nfs"

    def nf_dir(self, nf: str) -> Path:
        return self.nfs_dir() / nf

    def maps_dir(self, nf: str) -> Path:
        return self.nf_dir(nf) / "maps"

    def map_pin(self, nf: str, map_name: str) -> Path:
        return self.maps_dir(nf) / map_name

    def progs_dir(self, nf: str) -> Path:
        return self.nf_dir(nf) / "progs"

    def prog_pin(self, nf: str, build_hash: str) -> Path:
        return self.progs_dir(nf) / build_hash[:32]

    def staging_dir(self, nf: str, tag: str) -> Path:
        return self.nf_dir(nf) / "staging" / tag

    def pinned_nfs(self) -> list[str]:
        folder = self.nfs_dir()
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def pinned_progs(self, nf: str) -> list[Path]:
        folder = self.progs_dir(nf)
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def pinned_maps(self, nf: str) -> list[Path]:
        folder = self.maps_dir(nf)
        return sorted(folder.iterdir()) if folder.is_dir() else []


def remove_tree(path: Path) -> None:
    """Unpin everything under path (bpffs supports unlink/rmdir like any filesystem)."""
    if not path.exists():
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():  # rmtree may stop at pins it cannot stat; go file by file
            for dirpath, dirnames, filenames in os.walk(path, topdown=False):
                for name in filenames:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(dirpath, name))
                for name in dirnames:
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(dirpath, name))
            with contextlib.suppress(OSError):
                os.rmdir(path)
    else:
        path.unlink(missing_ok=True)
