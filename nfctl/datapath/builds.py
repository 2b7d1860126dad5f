"""Pinned NF versions: adopt one from its pin, put a live version's staged maps in place,
drop a version that never went live, and unpin versions or whole NFs no chain needs."""

from __future__ import annotations

import os
import time

from nfctl.bpf.abi import entry_name
from nfctl.bpf.syscall import BpfProgram
from nfctl.datapath.model import LoadedBuild
from nfctl.datapath.pins import BpffsPaths, remove_tree
from nfctl.datapath.records import RecordStore


class PinnedBuilds:
    """The NF program versions pinned under one bpffs root and their build records."""

    def __init__(self, paths: BpffsPaths, records: RecordStore) -> None:
        self.paths = paths
        self.records = records

    def find_loaded(self, nf: str, build_hash: str) -> LoadedBuild | None:
        """Adopt an already pinned program of this build: no compile."""
        pin = self.paths.prog_pin(nf, build_hash)
        record = self.records.load(build_hash)
        if not pin.exists() or record is None:
            return None
        try:
            with BpfProgram.from_pin(str(pin)) as prog:
                if prog.info.name != entry_name(build_hash)[:15]:
                    return None
                return LoadedBuild(
                    record=record,
                    prog_pin=pin,
                    prog_id=prog.info.prog_id,
                    tag=prog.info.tag,
                    compiled=False,
                )
        except OSError:
            return None

    def put_staged_maps(self, loaded: LoadedBuild) -> None:
        """Put the staged maps of a version that is live everywhere in place of the old
        ones (what the old version wrote meanwhile is merged first: Builder.commit)."""
        for swap in loaded.swaps:
            # bpffs refuses names with a dot
            retired = swap.final_pin.with_name(f"retired-{swap.name}-{int(time.time() * 1000)}")
            if swap.final_pin.exists():
                os.rename(swap.final_pin, retired)
            os.rename(swap.staged_pin, swap.final_pin)
            retired.unlink(missing_ok=True)
        if loaded.swaps:
            remove_tree(loaded.swaps[0].staged_pin.parent)
            loaded.swaps = []

    def discard(self, loaded: LoadedBuild) -> None:
        """Drop a build that never went live (its program pin and staged maps)."""
        loaded.prog_pin.unlink(missing_ok=True)
        for swap in loaded.swaps:
            remove_tree(swap.staged_pin.parent)
        self.records.delete(loaded.build_hash)

    def release_versions(self, nf: str, keep: set[str]) -> list[str]:
        """Unpin program versions of nf not in keep (build hashes). The kernel frees them
        once no chain references them."""
        released = []
        keep_names = {h[:32] for h in keep}
        for pin in self.paths.pinned_progs(nf):
            if pin.name not in keep_names:
                pin.unlink(missing_ok=True)
                released.append(pin.name)
                for record in self.records.all():
                    if record.nf == nf and record.build_hash[:32] == pin.name:
                        self.records.delete(record.build_hash)
        return released

    def remove_nf(self, nf: str) -> None:
        """Unpin every program version and map of nf, and forget its build records."""
        for record in self.records.all():
            if record.nf == nf:
                self.records.delete(record.build_hash)
        remove_tree(self.paths.nf_dir(nf))
