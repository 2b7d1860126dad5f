"""The compile worker: a short-lived process that imports BCC (and so LLVM), compiles,
verifies, loads and pins programs, reports as JSON on stdout, and exits.

Keeping this out of the agent keeps the agent small (~74 MB just for `import bcc`) and
survives LLVM crashing. Run as `python -m nfctl.compiler.worker` with a JSON list of
requests on stdin.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from nfctl.bpf import progcopy, progrefs, syscall
from nfctl.bpf.abi import DISPATCHER_PREFIX, dispatcher_name, entry_name
from nfctl.bpf.mapinfo import MapInfo
from nfctl.compiler.build import BuildRequest, BuildResult, MapMismatch, ProgramInfo
from nfctl.compiler.codegen import ChainNames, dispatcher_program, nf_program
from nfctl.compiler.diagnose import clang_diagnostics, verifier_diagnostic
from nfctl.compiler.isolation import ProgramRefs, TableRef, check_isolation, helper_calls
from nfctl.compiler.sandbox import (
    UNCONFINED_ENV,
    ConfinementError,
    enter,
    kernel_header_paths,
    plan_view,
    runtime_paths,
)
from nfctl.diagnostics import Diagnostic
from nfctl.manifest.model import Hook

# The client passes an open file by descriptor number in this variable: captures write
# there, so that when LLVM aborts the process the client still reads what it printed.
CRASH_LOG_ENV = "NFCTL_COMPILE_LOG_FD"
# Written to stderr before and after each request (with its index): name the build a
# crash hit.
BUILD_MARKER = "nfctl-worker: building request "
BUILT_MARKER = "nfctl-worker: built request "


def _crash_log_fd() -> int | None:
    value = os.environ.get(CRASH_LOG_ENV, "")
    return int(value) if value.isdigit() else None


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """BCC and libbpf print clang errors and verifier logs straight to fd 2. The file
    holds text only during a capture: a crash outside one leaves nothing stale there."""
    sink: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    shared = _crash_log_fd()
    with contextlib.ExitStack() as stack:
        if shared is None:
            shared = stack.enter_context(tempfile.TemporaryFile(mode="w+b")).fileno()
        os.ftruncate(shared, 0)
        os.lseek(shared, 0, os.SEEK_SET)
        os.dup2(shared, 2)
        try:
            yield sink
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            os.lseek(shared, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(shared, 1 << 16):
                chunks.append(chunk)
            os.ftruncate(shared, 0)
            sink.append(b"".join(chunks).decode("utf-8", errors="replace"))


def _listing(*folders: str | None) -> set[str]:
    seen: set[str] = set()
    for folder in folders:
        if folder and os.path.isdir(folder):
            seen.update(os.path.join(folder, name) for name in os.listdir(folder))
    return seen


def build_one(req: BuildRequest) -> BuildResult:
    from bcc import BPF, lib

    result = BuildResult(nf=req.nf, build_hash=req.build_hash, ok=False)
    hook = Hook(req.hook)
    is_dispatcher = req.nf.startswith(DISPATCHER_PREFIX)
    names = ChainNames.fresh()
    if is_dispatcher:
        text = dispatcher_program(hook, req.pins)
        function = dispatcher_name(hook)
    else:
        text = nf_program(
            source_rel=req.source_rel,
            source_text=req.source_text,
            function=req.function,
            hook=hook,
            build_hash=req.build_hash,
            pins=req.pins,
            names=names,
            monitor=req.monitor,
        )
        function = entry_name(req.build_hash)
    staged_dirs = [d for _, d in req.pins.staged_maps]
    for folder in [req.pins.maps_dir, *staged_dirs]:
        if req.install and folder:
            os.makedirs(folder, exist_ok=True)
    pins_before = _listing(req.pins.maps_dir, *staged_dirs)
    all_pins_before = _pins_under(_nfctl_root(req))
    cflags = [f"-iquote{req.quote_dir}", *req.cflags] if req.quote_dir else list(req.cflags)

    start = time.monotonic()
    with captured_stderr() as err:
        try:
            module = BPF(text=text, cflags=cflags)
        except Exception:
            module = None
    result.compile_seconds = time.monotonic() - start
    if module is None:
        result.diagnostics = clang_diagnostics(
            err[0], req.source_rel, req.repo_root, public_paths(req)
        )
        return result

    created: list[str] = []
    try:
        result.maps = _map_infos(module, lib, req)
        pins_after = _listing(req.pins.maps_dir, *staged_dirs)
        created = sorted(pins_after - pins_before) if req.install else []
        for info in result.maps:
            info.created = info.pin_path in created if info.pin_path else False
        if req.install:
            result.mismatches = _mismatches(module, lib, result.maps, created)
            if result.mismatches:
                result.diagnostics = [
                    Diagnostic(file=req.source_rel, message=m.describe()) for m in result.mismatches
                ]
                return result
        prog_type = BPF.XDP if hook is Hook.XDP else BPF.SCHED_CLS
        start = time.monotonic()
        with captured_stderr() as err:
            try:
                fn = module.load_func(function, prog_type)
            except Exception as exc:
                fn = None
                load_error = str(exc)
        result.load_seconds = time.monotonic() - start
        if fn is None:
            log = err[0]
            if "Permission denied" in log or "processed " in log or "invalid" in log:
                repo_files = [req.source_rel, *req.local_files]
                result.diagnostics = [
                    verifier_diagnostic(
                        log, req.source_rel, req.source_text, req.function, repo_files, nf=req.nf
                    )
                ]
            else:
                result.diagnostics = [
                    Diagnostic(file=req.source_rel, message=load_error, detail=log.strip() or None)
                ]
            return result
        if not is_dispatcher:
            start = time.monotonic()
            problems, foreign_ids = _isolation_problems(module, lib, fn.fd, names, req, prog_type)
            result.check_seconds = time.monotonic() - start
            if problems:
                _unpin_planted(_nfctl_root(req), all_pins_before, foreign_ids)
                result.diagnostics = [
                    Diagnostic(file=req.source_rel, message=f"NF {req.nf!r} refused: {problem}")
                    for problem in problems
                ]
                return result
        prog = syscall.prog_info(fn.fd)
        pin_path = None
        if req.install and req.prog_pin_path:
            os.makedirs(os.path.dirname(req.prog_pin_path), exist_ok=True)
            if os.path.exists(req.prog_pin_path):
                os.unlink(req.prog_pin_path)
            syscall.obj_pin(fn.fd, req.prog_pin_path)
            pin_path = req.prog_pin_path
        result.program = ProgramInfo(
            name=prog.name, prog_id=prog.prog_id, tag=prog.tag, pin_path=pin_path
        )
        if req.install and req.test_pin_path and not is_dispatcher:
            _pin_test_copy(module, lib, function, prog_type, req.test_pin_path, result)
        result.ok = True
        created = []  # keep what this build pinned
        return result
    finally:
        for path in created:  # a failed build leaves no new pins behind
            with contextlib.suppress(OSError):
                os.unlink(path)
        module.cleanup()


def _pin_test_copy(
    module: Any, lib: Any, function: str, prog_type: int, path: str, result: BuildResult
) -> None:
    """The gate's private copy of the program just verified (nfctl.bpf.progcopy). Only
    after the isolation check passed: the copy has the same code, so the same references.
    A copy that fails is reported, not fatal: the gate then makes a test build."""
    import ctypes

    start = time.monotonic()
    try:
        name = function.encode()
        insns = ctypes.string_at(
            lib.bpf_function_start(module.module, name), lib.bpf_function_size(module.module, name)
        )
        fd = progcopy.load_copy(insns, prog_type, function)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            syscall.obj_pin(fd, path)
        finally:
            os.close(fd)
        result.test_pin_path = path
    except OSError as exc:
        result.test_copy_error = str(exc)
    result.test_copy_seconds = time.monotonic() - start


def snapshot(req: BuildRequest) -> dict[str, str]:
    """The repository files this build may read, by absolute path: what the guard read."""
    if not req.repo_root:
        return {}
    files = {req.source_rel: req.source_text, **req.local_files}
    return {os.path.join(req.repo_root, rel): text for rel, text in files.items()}


def public_paths(req: BuildRequest) -> list[str]:
    """Files whose text a diagnostic may quote: the snapshot and the kernel headers."""
    return [*snapshot(req), *(os.path.realpath(p) for p in kernel_header_paths())]


def pin_dirs(req: BuildRequest) -> list[str]:
    if not req.install:
        return []
    pins = req.pins
    files = [
        pins.chain_path,
        pins.cursor_path,
        pins.heads_path,
        pins.heads_index_path,
        pins.counters_path,
        pins.slots_path,
        req.prog_pin_path,
        req.test_pin_path,
    ]
    dirs = [pins.maps_dir, *(d for _, d in pins.staged_maps)]
    dirs += [os.path.dirname(f) for f in files if f]
    return [d for d in dict.fromkeys(dirs) if d]


def confine(requests: list[BuildRequest]) -> None:
    """Enter the allowlisted view of this batch (see nfctl.compiler.sandbox)."""
    folders = [d for r in requests for d in pin_dirs(r)]
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
    files = {path: text for r in requests for path, text in snapshot(r).items()}
    enter(plan_view(files, folders, runtime_paths(), kernel_header_paths()))


def _isolation_problems(
    module: Any, lib: Any, wrapped_fd: int, names: ChainNames, req: BuildRequest, prog_type: int
) -> tuple[list[str], set[int]]:
    """Load the author's function alone and check what both programs really reference.
    Also returns the ids of maps the source placed outside its own folder."""
    staged = dict(req.pins.staged_maps)
    chain_pins = {
        names.chain: req.pins.chain_path,
        names.cursor: req.pins.cursor_path,
        names.counters: req.pins.counters_path,
        names.slots: req.pins.slots_path,
    }
    own: list[TableRef] = []
    chain: list[TableRef] = []
    for index in range(lib.bpf_num_tables(module.module)):
        name = lib.bpf_table_name(module.module, index).decode()
        map_id, map_type = progrefs.map_id_and_type(lib.bpf_table_fd(module.module, name.encode()))
        if name in chain_pins:
            pin = chain_pins[name] if req.install else None
            chain.append(TableRef(name, map_id, map_type, pin, _pinned_id(pin)))
            continue
        folder = staged.get(name, req.pins.maps_dir)
        pin = os.path.join(folder, name) if req.install and folder else None
        own.append(TableRef(name, map_id, map_type, pin, _pinned_id(pin)))
    probe_fd = module.load_func(names.probe, prog_type).fd
    problems = check_isolation(own, chain, _refs(probe_fd), _refs(wrapped_fd))
    foreign = {t.map_id for t in own + chain if t.pin_path and t.pinned_id != t.map_id}
    return problems, foreign


def _nfctl_root(req: BuildRequest) -> str | None:
    """nfctl's bpffs folder: the chain is pinned at <root>/<kind>/chain."""
    if not req.install or not req.pins.chain_path:
        return None
    return os.path.dirname(os.path.dirname(req.pins.chain_path))


def _pins_under(root: str | None) -> set[str]:
    if root is None:
        return set()
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files}


def _unpin_planted(root: str | None, before: set[str], foreign_ids: set[int]) -> None:
    """A refused source may have made BCC pin new maps in another NF's folder (a name that
    NF might declare later): remove the new pins that hold this build's foreign maps.
    Matching by map id leaves alone whatever other builds pin at the same time."""
    for path in sorted(_pins_under(root) - before):
        if progrefs.pinned_map_id(path) in foreign_ids:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _pinned_id(path: str | None) -> int | None:
    return progrefs.pinned_map_id(path) if path else None


def _refs(prog_fd: int) -> ProgramRefs:
    loaded = progrefs.loaded_refs(prog_fd)
    return ProgramRefs(frozenset(loaded.map_ids), helper_calls(loaded.xlated))


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError):
        return raw.decode(errors="replace")


def _declare_table_api(lib: Any) -> None:
    """BCC's Python bindings leave these untyped; they take the table's index."""
    import ctypes as ct

    for name, restype in (
        ("bpf_num_tables", ct.c_size_t),
        ("bpf_table_name", ct.c_char_p),
        ("bpf_table_fd_id", ct.c_int),
        ("bpf_table_type_id", ct.c_int),
        ("bpf_table_max_entries_id", ct.c_size_t),
        ("bpf_table_flags_id", ct.c_int),
        ("bpf_table_key_size_id", ct.c_size_t),
        ("bpf_table_leaf_size_id", ct.c_size_t),
        ("bpf_table_key_desc_id", ct.c_char_p),
        ("bpf_table_leaf_desc_id", ct.c_char_p),
    ):
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = [ct.c_void_p] if name == "bpf_num_tables" else [ct.c_void_p, ct.c_size_t]


def _map_infos(module: Any, lib: Any, req: BuildRequest) -> list[MapInfo]:
    _declare_table_api(lib)
    staged = dict(req.pins.staged_maps)
    infos = []
    handle = module.module
    for index in range(lib.bpf_num_tables(handle)):
        name = lib.bpf_table_name(handle, index).decode()
        if name.startswith("nfctl_"):
            continue
        folder = staged.get(name, req.pins.maps_dir)
        type_id = lib.bpf_table_type_id(handle, index)
        infos.append(
            MapInfo(
                name=name,
                map_type=syscall.MAP_TYPE_NAMES.get(type_id, str(type_id)),
                type_id=type_id,
                key_size=lib.bpf_table_key_size_id(handle, index),
                value_size=lib.bpf_table_leaf_size_id(handle, index),
                max_entries=lib.bpf_table_max_entries_id(handle, index),
                flags=lib.bpf_table_flags_id(handle, index),
                key_desc=_decode(lib.bpf_table_key_desc_id(handle, index) or b""),
                value_desc=_decode(lib.bpf_table_leaf_desc_id(handle, index) or b""),
                pin_path=os.path.join(folder, name) if req.install and folder else None,
            )
        )
    return infos


def _mismatches(
    module: Any, lib: Any, maps: list[MapInfo], created: list[str]
) -> list[MapMismatch]:
    """Compare every reused pin with the declaration: BCC reuses pins without checking."""
    found = []
    for info in maps:
        fd = lib.bpf_table_fd(module.module, info.name.encode())
        if fd < 0 or info.pin_path in created:
            continue
        kernel = syscall.map_info(fd)
        declared = {
            "type": info.type_id,
            "key_size": info.key_size,
            "value_size": info.value_size,
            "max_entries": info.max_entries,
            "flags": info.flags,
        }
        pinned = {
            "type": kernel.map_type,
            "key_size": kernel.key_size,
            "value_size": kernel.value_size,
            "max_entries": kernel.max_entries,
            "flags": kernel.flags,
        }
        if declared != pinned:
            found.append(
                MapMismatch(
                    name=info.name, pin_path=info.pin_path or "", declared=declared, pinned=pinned
                )
            )
    return found


def main() -> int:
    # Load LLVM and BCC first: a warm standby worker does this before any request arrives,
    # and it must happen before secrets disappear from view.
    import bcc  # noqa: F401

    requests = [BuildRequest.from_json(r) for r in json.load(sys.stdin)]
    refused: str | None = None
    if os.environ.get(UNCONFINED_ENV) == "1":
        print("warning: compiling WITHOUT confinement (--unconfined-compile)", file=sys.stderr)
    else:
        try:
            confine(requests)
        except (ConfinementError, OSError) as exc:
            refused = (
                f"compiling refused: the compile confinement could not be set up ({exc}); "
                "pass --unconfined-compile to compile without it"
            )
    # Anything BCC or LLVM prints must not corrupt the JSON answer on stdout.
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    results = []
    for index, req in enumerate(requests):
        print(f"{BUILD_MARKER}{index}", file=sys.stderr, flush=True)
        if refused:
            failed = BuildResult(
                nf=req.nf,
                build_hash=req.build_hash,
                ok=False,
                diagnostics=[Diagnostic(file=req.source_rel, message=refused)],
            )
            results.append(failed.to_json())
            continue
        try:
            results.append(build_one(req).to_json())
        except Exception as exc:  # report, never crash the batch
            results.append(
                BuildResult(
                    nf=req.nf,
                    build_hash=req.build_hash,
                    ok=False,
                    diagnostics=[
                        Diagnostic(file=req.source_rel, message=f"internal build error: {exc!r}")
                    ],
                ).to_json()
            )
        print(f"{BUILT_MARKER}{index}", file=sys.stderr, flush=True)
    json.dump(results, answer)
    answer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
