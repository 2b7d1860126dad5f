"""The fan-out timing line a replica logs (commands.Delivery) is what
benchmarks/controller_scale.py parses: the two must agree, offsets from `recorded`."""

from __future__ import annotations

import pytest

from benchmarks.controller_scale import FANOUT_LOG
from nfctl.controller.commands import Delivery


def test_the_logged_fanout_line_parses_with_offsets_from_recorded() -> None:
    delivery = Delivery("cmd-7-abc", recorded=1000.0, learned=1000.04)
    delivery.claimed, delivery.queued, delivery.streams = 1000.09, 1000.1, 3
    delivery.written = [1000.5, 1000.3, 1000.9]
    match = FANOUT_LOG.search("INFO nfctl.controller.commands: " + delivery.summary())
    assert match is not None
    fields = match.groupdict()
    assert fields["id"] == "cmd-7-abc"
    assert (int(fields["streams"]), int(fields["written"])) == (3, 3)
    assert float(fields["recorded"]) == 1000.0
    offsets = {k: float(fields[k]) for k in ("relay", "claim", "queue", "write_p50", "write_last")}
    assert offsets == pytest.approx(
        {"relay": 0.04, "claim": 0.09, "queue": 0.1, "write_p50": 0.5, "write_last": 0.9},
        abs=1e-3,
    )


def test_a_fanout_with_no_stream_written_yet_reports_the_queue_time() -> None:
    delivery = Delivery("cmd-1", recorded=5.0, learned=5.0)
    delivery.claimed, delivery.queued, delivery.streams = 5.2, 5.25, 10
    match = FANOUT_LOG.search(delivery.summary())
    assert match is not None
    assert match["written"] == "0"
    assert float(match["write_last"]) == pytest.approx(0.25, abs=1e-3)
