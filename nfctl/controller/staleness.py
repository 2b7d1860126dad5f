"""When a node counts as stale, and how often its agent sends a heartbeat to avoid it."""

from __future__ import annotations

# A node is stale after missing this many heartbeats in a row (by default the heartbeat is
# stale_after divided by it): one late or lost message never makes a healthy node stale.
HEARTBEATS_PER_STALE = 3


def is_stale(last_seen: float, stale_after: float, now: float) -> bool:
    """No report for longer than stale_after."""
    return now - last_seen > stale_after


def heartbeat_interval(stale_after: float, heartbeat: float | None = None) -> float:
    """The heartbeat agents are told to keep: the one configured, or a fraction of
    stale_after so that a node is stale only after it missed several in a row."""
    return heartbeat or stale_after / HEARTBEATS_PER_STALE
