"""Shared output helpers: JSON for machines, rich for people."""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from typing import Any

import yaml
from rich.console import Console

from nfctl.diagnostics import Diagnostic


def _width() -> int | None:
    # Piped output (CI logs, `| less`) gets a wide table instead of rich's 80 columns.
    return None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))


console = Console(width=_width())
err_console = Console(stderr=True, width=_width())


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"
    YAML = "yaml"


def emit_data(data: Any, fmt: OutputFormat) -> None:
    if fmt is OutputFormat.JSON:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


def print_diagnostic(diag: Diagnostic, verbose: bool = False) -> None:
    color = "red" if diag.severity == "error" else "yellow"
    field = f" [dim]({diag.field})[/dim]" if diag.field else ""
    console.print(f"  [{color}]{diag.severity}[/{color}] {diag.location()}{field}: ", end="")
    console.print(diag.message, markup=False, highlight=False)
    if diag.detail and verbose:
        for line in diag.detail.splitlines()[-40:]:
            console.print(f"      {line}", markup=False, highlight=False)
