"""Progress lines on stderr for long commands: on when stderr is a terminal or with
--progress, never on stdout (so -o json stays pure JSON)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.markup import escape

from nfctl import progress
from nfctl.cli.output import err_console

PROGRESS = typer.Option(
    None,
    "--progress/--no-progress",
    help="progress lines on stderr [default: when stderr is a terminal]",
)


def wanted(flag: bool | None) -> bool:
    return sys.stderr.isatty() if flag is None else flag


@contextmanager
def reporting(flag: bool | None) -> Iterator[None]:
    if not wanted(flag):
        yield
        return
    start = time.monotonic()

    def show(text: str) -> None:
        # NF names and paths come from the repository: never read them as markup
        err_console.print(f"[dim]{time.monotonic() - start:6.1f}s[/dim] {escape(text)}")

    with progress.sink(show):
        yield
