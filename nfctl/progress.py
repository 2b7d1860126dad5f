"""Progress notes from long work (compiling many NFs, running their tests) to whoever listens.

Library code calls `note(...)`; only a command line installs a sink (`nfctl.cli.progress`),
so the agent and tests stay silent. A module-level sink, not a parameter threaded through
every call, because builds finish on worker threads several calls below the command."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Sink = Callable[[str], None]

_lock = threading.Lock()
_sink: Sink | None = None


def note(text: str) -> None:
    with _lock:
        if _sink is not None:
            _sink(text)


def enabled() -> bool:
    return _sink is not None


@contextmanager
def sink(target: Sink) -> Iterator[None]:
    global _sink
    with _lock:
        previous, _sink = _sink, target
    try:
        yield
    finally:
        with _lock:
            _sink = previous
