"""Facts about this machine that identify builds and explain failures."""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import re
from pathlib import Path


@functools.cache
def kernel_release() -> str:
    return platform.release()


@functools.cache
def bcc_version() -> str:
    """BCC's version without importing bcc (importing it loads LLVM: ~70 MB)."""
    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return "missing"
    version_file = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", version_file.read_text())
    except OSError:
        return "unknown"
    return match.group(1) if match else "unknown"


def kernel_headers_dir() -> Path:
    return Path("/lib/modules") / kernel_release() / "build"


def is_root() -> bool:
    return os.geteuid() == 0
