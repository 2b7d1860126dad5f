"""The interfaces nfctl attached to, with the hooks it holds there and whether it created
their clsact qdisc: kept in the state dir so detaching leaves an interface as nfctl found
it, also after the agent restarts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nfctl.datapath.records import write_json_atomic
from nfctl.manifest.model import Hook


class TouchedInterfaces:
    """interfaces.json: interface name -> {ifindex, hooks, created_clsact}."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "datapath" / "interfaces.json"
        # hooks known to be recorded: a chain update then reads no file at all
        self._noted: set[tuple[str, int, Hook]] = set()

    def all(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def note_hook(self, ifname: str, ifindex: int, hook: Hook) -> None:
        if (ifname, ifindex, hook) in self._noted:
            return
        state = self.all()
        entry = state.get(ifname)
        if entry and entry.get("ifindex") == ifindex and hook.value in entry.get("hooks", []):
            self._noted.add((ifname, ifindex, hook))
            return  # already recorded: no write on the hot path of a chain update
        entry = state.setdefault(ifname, {"ifindex": ifindex, "hooks": [], "created_clsact": False})
        if entry.get("ifindex") != ifindex:
            entry.update({"ifindex": ifindex, "hooks": [], "created_clsact": False})
        if hook.value not in entry["hooks"]:
            entry["hooks"].append(hook.value)
        write_json_atomic(self.path, state)
        self._noted.add((ifname, ifindex, hook))

    def note_clsact_created(self, ifname: str) -> None:
        state = self.all()
        state.setdefault(ifname, {"ifindex": 0, "hooks": []})["created_clsact"] = True
        write_json_atomic(self.path, state)

    def created_clsact(self, ifname: str) -> bool:
        return bool(self.all().get(ifname, {}).get("created_clsact"))

    def other_tc_hook_in_use(self, ifname: str, hook: Hook) -> bool:
        hooks = self.all().get(ifname, {}).get("hooks", [])
        return any(h != hook.value and h != Hook.XDP.value for h in hooks)

    def forget_hook(self, ifname: str, hook: Hook) -> None:
        self._noted = {n for n in self._noted if n[0] != ifname or n[2] is not hook}
        state = self.all()
        entry = state.get(ifname)
        if entry is None:
            return
        entry["hooks"] = [h for h in entry.get("hooks", []) if h != hook.value]
        if not entry["hooks"]:
            del state[ifname]
        write_json_atomic(self.path, state)

    def clear(self) -> None:
        self._noted.clear()
        self.path.unlink(missing_ok=True)
