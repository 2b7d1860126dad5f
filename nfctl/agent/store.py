"""The agent's state folder: applied state, status, bounded events, suspensions, lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nfctl.datapath.records import write_json_atomic
from nfctl.wire.status import Event, NodeStatus

MAX_EVENTS = 1000


@dataclass
class AppliedNF:
    """The last good state of one NF on this node: what runs, and the spec it came from."""

    name: str
    manifest_path: str
    build_hash: str
    version: str
    revision: str
    spec: dict[str, Any]  # the NetworkFunction manifest, as applied
    applied_at: float
    entries_digest: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AppliedNF:
        return cls(**data)


@dataclass
class Suspensions:
    node: bool = False
    nfs: list[str] = field(default_factory=list)


class AgentLockedError(RuntimeError):
    pass


class StateStore:
    """The agent's state folder: what is applied, the last status, the bounded event log with
    its epoch, operator suspensions, and the lock that allows one agent per folder."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self._events_lock = threading.Lock()
        self._sequence = self._last_sequence()
        self.event_epoch = self._epoch()
        self._lock_fd: int | None = None
        self._applied_saved: dict[str, Any] | None = None

    # -- single agent per state folder ---------------------------------------------------
    def lock(self) -> None:
        fd = os.open(self.dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AgentLockedError(
                f"another nfctl agent is running with state dir {self.dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def agent_pid(self) -> int | None:
        try:
            return int((self.dir / "agent.lock").read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    # -- applied state -------------------------------------------------------------------
    def load_applied(self) -> dict[str, AppliedNF]:
        try:
            data = json.loads((self.dir / "applied.json").read_text())
            return {name: AppliedNF.from_json(v) for name, v in data.items()}
        except (OSError, ValueError, TypeError):
            return {}

    def save_applied(self, applied: dict[str, AppliedNF]) -> None:
        data = {k: asdict(v) for k, v in applied.items()}
        if data != self._applied_saved:  # every pass calls this; most change nothing
            write_json_atomic(self.dir / "applied.json", data)
            self._applied_saved = data

    # -- status --------------------------------------------------------------------------
    def save_status(self, status: NodeStatus) -> None:
        # rewritten on every pass and at every change: a snapshot, not a record to keep
        write_json_atomic(self.dir / "status.json", status.dump(), durable=False)

    def load_status(self) -> NodeStatus | None:
        try:
            return NodeStatus.model_validate(json.loads((self.dir / "status.json").read_text()))
        except (OSError, ValueError):
            return None

    # -- events --------------------------------------------------------------------------
    def _epoch(self) -> str:
        """The id of this event log: sequence numbers mean something only within it (a
        wiped state dir starts again at 1, and the controller must not take those for
        events it already has)."""
        path = self.dir / "events-epoch.json"
        with contextlib.suppress(OSError, ValueError, AttributeError):
            epoch = json.loads(path.read_text()).get("epoch")
            if isinstance(epoch, str) and epoch:
                return epoch
        epoch = uuid.uuid4().hex
        write_json_atomic(path, {"epoch": epoch})
        return epoch

    def _last_sequence(self) -> int:
        events = self.events()
        return events[-1].sequence if events else 0

    def append_event(self, event: Event) -> Event:
        with self._events_lock:
            self._sequence += 1
            event.sequence = self._sequence
            path = self.dir / "events.jsonl"
            with path.open("a") as handle:
                handle.write(json.dumps(event.dump()) + "\n")
            if path.stat().st_size > 400 * MAX_EVENTS:
                self._compact(path)
        return event

    def _compact(self, path: Path) -> None:
        lines = path.read_text().splitlines()[-MAX_EVENTS:]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)

    def events(self, since: int = 0, limit: int = MAX_EVENTS) -> list[Event]:
        path = self.dir / "events.jsonl"
        out: list[Event] = []
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines()[-MAX_EVENTS:]:
                with contextlib.suppress(ValueError):
                    event = Event.model_validate(json.loads(line))
                    if event.sequence > since:
                        out.append(event)
        return out[-limit:]

    # -- suspensions -----------------------------------------------------------------------
    def suspensions(self) -> Suspensions:
        try:
            data = json.loads((self.dir / "suspend.json").read_text())
            return Suspensions(node=bool(data.get("node")), nfs=sorted(set(data.get("nfs", []))))
        except (OSError, ValueError, AttributeError):
            return Suspensions()

    def set_suspended(self, nf: str | None, suspended: bool) -> Suspensions:
        current = self.suspensions()
        if nf is None:
            current.node = suspended
        elif suspended:
            current.nfs = sorted(set(current.nfs) | {nf})
        else:
            current.nfs = [n for n in current.nfs if n != nf]
        write_json_atomic(self.dir / "suspend.json", asdict(current))
        return current
