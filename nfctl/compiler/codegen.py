"""Generate the C text BCC compiles for an NF and for the per-hook dispatchers.

How chaining works (no chaining code in NFs): each hook type has a pinned prog array
(the chain) and a per-CPU cursor. A dispatcher attached to the interface looks up the
attach point's current slot range ("head"), stores its base in the cursor and tail-calls
the first slot. Every NF is wrapped: if the author's function lets the packet go on
(XDP_PASS / TC_ACT_OK), the wrapper advances the cursor and tail-calls the next slot.
An empty slot ends the chain. Changing a chain means filling a fresh slot range and
switching the head: one atomic map update.

BCC only rewrites map calls in the main file, so the NF source is pasted inline under a
#line directive that keeps clang's diagnostics pointing at the author's file and line.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from nfctl.bpf.abi import (
    CHAIN_SLOTS,
    COUNTER_FIELDS,
    COUNTER_IDS,
    ERRORS_FIELD,
    HEADS_INDEX_ENTRIES,
    HEADS_INDEX_FLAGS,
    HEADS_INDEX_STRIDE,
    HEADS_INDEXED_IFINDEXES,
    HEADS_MAX,
    HOOK_IDS,
    MODES,
    VERDICTS,
    dispatcher_name,
    entry_name,
)
from nfctl.compiler.source_guard import logical_lines
from nfctl.manifest.model import Hook

WRAPPER_FILE = "<nfctl-generated>"

# BCC's BPF_F_TABLE body (bcc 0.26 helpers.h) with the section chosen by nfctl. BCC's
# frontend recognises tables by this struct layout; a test pins user maps end to end so a
# BCC upgrade that changes the layout fails loudly.
_PREAMBLE = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#define NFCTL_TABLE_AT(_section, _key_type, _leaf_type, _name, _max_entries, _flags) \
struct _name##_table_t { \
  _key_type key; \
  _leaf_type leaf; \
  _leaf_type * (*lookup) (_key_type *); \
  _leaf_type * (*lookup_or_init) (_key_type *, _leaf_type *); \
  _leaf_type * (*lookup_or_try_init) (_key_type *, _leaf_type *); \
  int (*update) (_key_type *, _leaf_type *); \
  int (*insert) (_key_type *, _leaf_type *); \
  int (*delete) (_key_type *); \
  void (*call) (void *, int index); \
  void (*increment) (_key_type, ...); \
  void (*atomic_increment) (_key_type, ...); \
  int (*get_stackid) (void *, u64); \
  void * (*sk_storage_get) (void *, void *, int); \
  int (*sk_storage_delete) (void *); \
  void * (*inode_storage_get) (void *, void *, int); \
  int (*inode_storage_delete) (void *); \
  void * (*task_storage_get) (void *, void *, int); \
  int (*task_storage_delete) (void *); \
  u32 max_entries; \
  int flags; \
}; \
__attribute__((section(_section))) \
struct _name##_table_t _name = { .flags = (_flags), .max_entries = (_max_entries) }; \
BPF_ANNOTATE_KV_PAIR(_name, _key_type, _leaf_type)
#undef BPF_F_TABLE
#define BPF_F_TABLE(_table_type, _key_type, _leaf_type, _name, _max_entries, _flags) \
  NFCTL_TABLE_AT(NFCTL_MAP_SECTION(_table_type, _name), _key_type, _leaf_type, _name, \
                 _max_entries, _flags)
"""


@dataclass(frozen=True)
class BuildPins:
    """Where the generated code pins maps; None fields mean 'do not pin' (verify only)."""

    maps_dir: str | None = None
    chain_path: str | None = None
    cursor_path: str | None = None
    heads_path: str | None = None
    heads_index_path: str | None = None
    counters_path: str | None = None
    slots_path: str | None = None
    # map name -> folder, for maps that must be created fresh at a staging location
    staged_maps: tuple[tuple[str, str], ...] = ()
    all_map_names: tuple[str, ...] = ()


def _c_string(value: str) -> str:
    if any(ch in value for ch in '"\\\n'):
        raise ValueError(f"unsafe path for C string: {value!r}")
    return f'"{value}"'


def _section_macros(pins: BuildPins) -> str:
    lines = []
    if pins.maps_dir is None:
        lines.append('#define NFCTL_MAP_SECTION(_t, _name) "maps/" _t')
    elif pins.staged_maps:
        staged = dict(pins.staged_maps)
        for name in pins.all_map_names:
            lines.append(
                f"#define NFCTL_MAP_DIR_{name} {_c_string(staged.get(name, pins.maps_dir))}"
            )
        lines.append(
            '#define NFCTL_MAP_SECTION(_t, _name) "maps/" _t ":" NFCTL_MAP_DIR_##_name "/" #_name'
        )
    else:
        lines.append(f"#define NFCTL_MAPS_DIR {_c_string(pins.maps_dir)}")
        lines.append(
            '#define NFCTL_MAP_SECTION(_t, _name) "maps/" _t ":" NFCTL_MAPS_DIR "/" #_name'
        )
    return "\n".join(lines) + "\n"


def _section(kind: str, path: str | None) -> str:
    if path is None:
        return f'"maps/{kind}"'
    return f'"maps/{kind}:" {_c_string(path)}'


def _chain_tables(pins: BuildPins) -> str:
    return (
        f"NFCTL_TABLE_AT({_section('prog', pins.chain_path)}, u32, u32, nfctl_chain, "
        f"{CHAIN_SLOTS}, 0);\n"
        f"NFCTL_TABLE_AT({_section('percpu_array', pins.cursor_path)}, u32, u32, nfctl_cursor, "
        "1, 0);\n"
    )


def function_is_static(source: str, function: str) -> bool:
    pattern = re.compile(r"\bstatic\b[^;{}()]*\b" + re.escape(function) + r"\s*\(")
    return any(pattern.search(line) for _, line in logical_lines(source))


def function_is_defined(source: str, function: str) -> bool:
    text = "\n".join(line for _, line in logical_lines(source))
    return re.search(r"\b" + re.escape(function) + r"\s*\([^;]*?\)\s*\{", text, re.S) is not None


@dataclass(frozen=True)
class ChainNames:
    """Identifiers of the code generated after the author's source, fresh for every build.

    The author's code comes first in the translation unit and C needs a declaration before
    use, so it cannot name these; unguessable names also keep its macros off them."""

    chain: str
    cursor: str
    probe: str
    counters: str
    slots: str

    @classmethod
    def fresh(cls) -> ChainNames:
        token = secrets.token_hex(8)
        return cls(
            f"nfctl_chain_{token}",
            f"nfctl_cursor_{token}",
            f"nfctl_probe_{token}",
            f"nfctl_counters_{token}",
            f"nfctl_slots_{token}",
        )


# Numeric verdicts: the author may have redefined the names of the constants.
_XDP_PASS = 2
_TC_ACT_OK = 0
_TC_ACT_UNSPEC = -1
# verdict -> index in VERDICTS; anything else is "other". XDP_ABORTED drops the packet
# (with a trace event) and XDP_TX sends it back out: counted as drop and redirect.
_XDP_CLASSES = {2: 0, 1: 1, 0: 1, 4: 2, 3: 2}
_TC_CLASSES = {0: 0, -1: 0, 2: 1, 7: 2}
_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _hidden_table(section: str, key: str, leaf: str, name: str, max_entries: int) -> str:
    """NFCTL_TABLE_AT written out, so no macro the author defined can reshape it."""
    ops = [
        f"{leaf} * (*lookup) ({key} *);",
        f"{leaf} * (*lookup_or_init) ({key} *, {leaf} *);",
        f"{leaf} * (*lookup_or_try_init) ({key} *, {leaf} *);",
        f"int (*update) ({key} *, {leaf} *);",
        f"int (*insert) ({key} *, {leaf} *);",
        f"int (*delete) ({key} *);",
        "void (*call) (void *, int index);",
        f"void (*increment) ({key}, ...);",
        f"void (*atomic_increment) ({key}, ...);",
        "int (*get_stackid) (void *, unsigned long long);",
        "void * (*sk_storage_get) (void *, void *, int);",
        "int (*sk_storage_delete) (void *);",
        "void * (*inode_storage_get) (void *, void *, int);",
        "int (*inode_storage_delete) (void *);",
        "void * (*task_storage_get) (void *, void *, int);",
        "int (*task_storage_delete) (void *);",
    ]
    return (
        f"struct {name}_table_t {{ {key} key; {leaf} leaf; "
        + " ".join(ops)
        + " unsigned int max_entries; int flags; };\n"
        + f"__attribute__((section({section}))) struct {name}_table_t {name} = "
        + f"{{ .flags = 0, .max_entries = {max_entries} }};\n"
        + f"struct ____btf_map_{name} {{ {key} key; {leaf} value; }};\n"
        + f'struct ____btf_map_{name} __attribute__((section(".maps.{name}"), used)) '
        + f"____btf_map_{name} = {{ }};\n"
    )


def _undef_all(code: str) -> str:
    """#undef every identifier the generated code uses, keywords included: whatever the
    author's source defined, the generated code means what it says."""
    names = sorted(set(_IDENTIFIER_RE.findall(re.sub(r'"[^"]*"', "", code))))
    return "".join(f"#undef {name}\n" for name in names)


def _classify(hook: Hook) -> str:
    """C statements setting k to the verdict's index in VERDICTS."""
    classes = _XDP_CLASSES if hook is Hook.XDP else _TC_CLASSES
    lines = ["    unsigned int k = 3;\n"]
    for index in sorted(set(classes.values())):
        cond = " || ".join(f"verdict == {v}" for v, i in classes.items() if i == index)
        lines.append(f"    if ({cond}) k = {index};\n")
    return "".join(lines)


def nf_program(
    *,
    source_rel: str,
    source_text: str,
    function: str,
    hook: Hook,
    build_hash: str,
    pins: BuildPins,
    names: ChainNames,
    monitor: bool = False,
    counters: bool = True,
    fixed_slot: int | None = None,
    fixed_counter_id: int | None = None,
) -> str:
    """The full C text for one NF: preamble, the author's source, then the chain tables,
    the chaining wrapper and the probe (the author's function alone, loaded to check what
    it references).

    The wrapper counts the verdict (per mode) in the slot's counter entry. In monitor mode
    every verdict goes on down the chain as a pass. counters=False leaves the counting out,
    and fixed_slot makes the wrapper's slot a constant instead of the cursor's (so the
    kernel can patch its tail call into a direct jump; such a program serves one slot
    only), fixed_counter_id its counter entry a constant instead of the slot's label:
    design probes that only the chain_overhead benchmark builds."""
    ctx_type = "struct xdp_md" if hook is Hook.XDP else "struct __sk_buff"
    if function_is_static(source_text, function):
        rename = ""
        user_fn = function
    else:
        # A non-static function would become its own BPF program, which BCC cannot call.
        rename = f"#define {function} __attribute__((always_inline)) static inline nfctl_user_fn\n"
        user_fn = "nfctl_user_fn"
    if hook is Hook.XDP:
        go_on = f"verdict == {_XDP_PASS}"
        end_of_chain = f"return {_XDP_PASS};"
    else:
        go_on = f"verdict == {_TC_ACT_OK} || verdict == {_TC_ACT_UNSPEC}"
        # TC_ACT_UNSPEC lets tc filters of other tools (later priorities) still run.
        end_of_chain = f"return {_TC_ACT_UNSPEC};"
    if monitor:
        go_on = "1"
    u32 = "unsigned int"
    u64 = "unsigned long long"
    mode_base = MODES["monitor" if monitor else "enforce"] * len(VERDICTS)
    tables = _hidden_table(
        _section("prog", pins.chain_path), u32, u32, names.chain, CHAIN_SLOTS
    ) + _hidden_table(_section("percpu_array", pins.cursor_path), u32, u32, names.cursor, 1)
    count = ""
    count_error = ""
    if counters:
        tables += (
            f"struct {names.counters}_v {{ {u64} v[{COUNTER_FIELDS}]; }};\n"
            + _hidden_table(
                _section("percpu_array", pins.counters_path),
                u32,
                f"struct {names.counters}_v",
                names.counters,
                COUNTER_IDS,
            )
            + _hidden_table(_section("array", pins.slots_path), u32, u32, names.slots, CHAIN_SLOTS)
        )
        id_from = (
            f"  {u32} *id = {names.slots}.lookup(&slot);\n"
            if fixed_counter_id is None
            else f"  {u32} id_value = {int(fixed_counter_id)}, *id = &id_value;\n"
        )
        count = (
            id_from
            + f"  struct {names.counters}_v *c = id ? {names.counters}.lookup(id) : 0;\n"
            + "  if (c) {\n"
            + _classify(hook)
            + f"    c->v[{mode_base} + k] += 1;\n"
            + "  }\n"
        )
        # Reached only when the tail call failed: an error if the slot was given an NF.
        count_error = (
            f"    {u32} *next_id = {names.slots}.lookup(&next);\n"
            + f"    if (c && next_id && *next_id) c->v[{ERRORS_FIELD}] += 1;\n"
        )
    if fixed_slot is None:
        slot_from = (
            f"  {u32} zero = 0;\n"
            + f"  {u32} *pos = {names.cursor}.lookup(&zero);\n"
            + f"  if (!pos) {{ if ({go_on}) {end_of_chain} return verdict; }}\n"
            + f"  {u32} slot = *pos;\n"
        )
        advance = "    *pos = next;\n"
    else:
        slot_from = f"  {u32} slot = {int(fixed_slot)};\n"
        advance = ""
    generated = (
        tables
        + f"int {entry_name(build_hash)}({ctx_type} *ctx) {{\n"
        # volatile: a constant verdict must not fold the chaining code away, its presence
        # in the loaded program is checked
        + f"  volatile int verdict = {user_fn}(ctx);\n"
        + slot_from
        + count
        + f"  if ({go_on}) {{\n"
        + f"    {u32} next = slot + 1;\n"
        + advance
        + f"    {names.chain}.call(ctx, next);\n"
        + count_error
        + f"    {end_of_chain}\n"
        + "  }\n"
        + "  return verdict;\n"
        + "}\n"
        + f"int {names.probe}({ctx_type} *ctx) {{\n"
        + f"  return {user_fn}(ctx);\n"
        + "}\n"
    )
    return (
        _PREAMBLE
        + _section_macros(pins)
        + rename
        + f'#line 1 "{source_rel}"\n'
        + source_text
        # a blank line ends a trailing backslash continuation; ';' a dangling declaration
        + "\n\n;\n"
        + _undef_all(generated)
        + f'#line 1 "{WRAPPER_FILE}"\n'
        + generated
    )


def dispatcher_program(hook: Hook, pins: BuildPins) -> str:
    """The root program attached to each interface's hook; it starts the chain."""
    if hook is Hook.XDP:
        ctx_type, ifindex, go_on = "struct xdp_md", "ctx->ingress_ifindex", "XDP_PASS"
    else:
        ctx_type, ifindex, go_on = "struct __sk_buff", "ctx->ifindex", "TC_ACT_UNSPEC"
    return (
        _PREAMBLE
        + '#define NFCTL_MAP_SECTION(_t, _name) "maps/" _t\n'
        + _chain_tables(pins)
        + "struct nfctl_head_key { u32 ifindex; u32 hook; };\n"
        + f"NFCTL_TABLE_AT({_section('hash', pins.heads_path)}, struct nfctl_head_key, u32, "
        + f"nfctl_heads, {HEADS_MAX}, 0);\n"
        + f"NFCTL_TABLE_AT({_section('array', pins.heads_index_path)}, u32, u32, "
        + f"nfctl_heads_index, {HEADS_INDEX_ENTRIES}, {HEADS_INDEX_FLAGS});\n"
        + f'#line 1 "{WRAPPER_FILE}"\n'
        + f"int {dispatcher_name(hook)}({ctx_type} *ctx) {{\n"
        + f"  u32 ifindex = {ifindex};\n"
        + "  u32 first;\n"
        # the same head in two maps (nfctl.datapath.chain): an array entry is a direct
        # lookup, the hash covers ifindexes beyond the array
        + f"  if (ifindex < {HEADS_INDEXED_IFINDEXES}) {{\n"
        + f"    u32 index = ifindex * {HEADS_INDEX_STRIDE} + {HOOK_IDS[hook]};\n"
        + "    u32 *entry = nfctl_heads_index.lookup(&index);\n"
        + f"    if (!entry || !*entry) return {go_on};\n"
        + "    first = *entry - 1;\n"
        + "  } else {\n"
        + f"    struct nfctl_head_key key = {{ .ifindex = ifindex, .hook = {HOOK_IDS[hook]} }};\n"
        + "    u32 *base = nfctl_heads.lookup(&key);\n"
        + f"    if (!base) return {go_on};\n"
        + "    first = *base;\n"
        + "  }\n"
        + "  u32 zero = 0;\n"
        + "  u32 *pos = nfctl_cursor.lookup(&zero);\n"
        + f"  if (!pos) return {go_on};\n"
        + "  *pos = first;\n"
        + "  nfctl_chain.call(ctx, first);\n"
        + f"  return {go_on};\n"
        + "}\n"
    )
