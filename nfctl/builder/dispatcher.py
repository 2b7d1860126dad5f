"""Compiling the per-hook dispatchers (the root program of every chain, see
nfctl.datapath.dispatcher for attaching them)."""

from __future__ import annotations

import os
from pathlib import Path

from nfctl.bpf.abi import DISPATCHER_PREFIX, dispatcher_name
from nfctl.compiler.build import BuildRequest
from nfctl.compiler.client import run_worker
from nfctl.compiler.codegen import BuildPins
from nfctl.datapath.dispatcher import dispatcher_build
from nfctl.datapath.pins import BpffsPaths, hook_kind
from nfctl.diagnostics import DiagnosticError
from nfctl.manifest.model import Hook


def dispatcher_pins(paths: BpffsPaths, hook: Hook) -> BuildPins:
    kind = hook_kind(hook)
    return BuildPins(
        chain_path=str(paths.chain(kind)),
        cursor_path=str(paths.cursor(kind)),
        heads_path=str(paths.heads(kind)),
        heads_index_path=str(paths.heads_index(kind)),
    )


def compile_dispatcher(paths: BpffsPaths, hook: Hook, pin: Path) -> None:
    """Compile hook's dispatcher and pin it at pin; creates and pins the chain maps too."""
    os.makedirs(pin.parent, exist_ok=True)
    request = BuildRequest(
        nf=f"{DISPATCHER_PREFIX}{hook.value}",
        hook=hook.value,
        function=dispatcher_name(hook),
        cflags=[],
        source_rel=f"<nfctl dispatcher {hook.value}>",
        source_text="",
        quote_dir="",
        build_hash=dispatcher_build(hook),
        install=True,
        pins=dispatcher_pins(paths, hook),
        prog_pin_path=str(pin),
    )
    result = run_worker([request])[0]
    if not result.ok:
        raise DiagnosticError(result.diagnostics)
