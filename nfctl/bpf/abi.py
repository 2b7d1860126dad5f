"""The contract between the C code nfctl generates and the datapath that drives it: map
sizes, hook ids, counter fields and program names. Both sides import these from here, so
neither needs the other to agree on them (see nfctl.compiler.codegen for the C side)."""

from __future__ import annotations

from nfctl.manifest.model import Hook

CODEGEN_VERSION = "5"
DISPATCHER_VERSION = "3"
CHAIN_SLOTS = 65536  # prog-array entries per hook type
RANGE_SIZE = 32  # slots per chain range; the tail-call limit (33) bounds a chain anyway
HEADS_MAX = 8192
# Heads of interfaces below this ifindex are also in an array the dispatcher indexes
# directly (~30 ns per packet less than the hash lookup); larger ifindexes use the hash.
HEADS_INDEXED_IFINDEXES = 16384
HEADS_INDEX_STRIDE = 4  # entries per ifindex, one per hook id: ifindex * 4 + hook id
HEADS_INDEX_ENTRIES = HEADS_INDEXED_IFINDEXES * HEADS_INDEX_STRIDE
HEADS_INDEX_FLAGS = 1 << 10  # BPF_F_MMAPABLE: the agent reads it whole at start, in µs

HOOK_IDS = {Hook.XDP: 0, Hook.TC_INGRESS: 1, Hook.TC_EGRESS: 2}

# Verdict counters (nfctl.datapath.counters): one u64 per (mode, verdict), then errors.
VERDICTS = ("pass", "drop", "redirect", "other")
MODES = {"enforce": 0, "monitor": 1}
COUNTER_FIELDS = len(MODES) * len(VERDICTS) + 1
ERRORS_FIELD = COUNTER_FIELDS - 1
COUNTER_IDS = 4096  # (nf, attach point) pairs per hook type

# A build request whose NF name starts with this builds the dispatcher of the named hook.
DISPATCHER_PREFIX = "dispatcher:"


def head_index(ifindex: int, hook: Hook) -> int | None:
    """Where the dispatcher finds (ifindex, hook)'s head in the heads array (the value is
    the range base + 1, 0 for none), or None if the ifindex is beyond the array."""
    if not 0 < ifindex < HEADS_INDEXED_IFINDEXES:
        return None
    return ifindex * HEADS_INDEX_STRIDE + HOOK_IDS[hook]


def entry_name(build_hash: str) -> str:
    """Kernel program names hold 15 characters: 'nf_' + 12 hex digits of the build hash."""
    return "nf_" + build_hash[:12]


def dispatcher_name(hook: Hook) -> str:
    return {
        Hook.XDP: "nfctl_xdp",
        Hook.TC_INGRESS: "nfctl_tc_in",
        Hook.TC_EGRESS: "nfctl_tc_eg",
    }[hook]
