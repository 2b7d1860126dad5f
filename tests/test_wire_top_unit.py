"""`nfctl top`'s rates from node statuses as the controller hands them out: per NF, from
the verdict counters of the NF's mode, over the snapshots of the last few seconds."""

from __future__ import annotations

from nfctl.top import RateTracker, Row, Sample, rate_row, samples, select
from nfctl.wire.status import ErrorInfo, NFState, NFStatus, NodeStatus, Verdicts, VerdictTotals


def node(
    at: float,
    passed: int,
    dropped: int,
    mode: str = "enforce",
    errors: int = 0,
    name: str = "edge-1",
) -> NodeStatus:
    counts = Verdicts(passed=passed, dropped=dropped)
    totals = (
        VerdictTotals(monitor=counts, chain_errors=errors)
        if mode == "monitor"
        else VerdictTotals(enforce=counts, chain_errors=errors)
    )
    return NodeStatus(
        node=name,
        observed_at=at,
        functions=[
            NFStatus(name="fw", state=NFState.APPLIED, revision="abc", mode=mode, verdicts=totals),
            NFStatus(
                name="new",
                state=NFState.FAILED,
                last_error=ErrorInfo(message="verifier refused", file="nfs/new/new.c", line=7),
            ),
        ],
    )


def rows_of(tracker: RateTracker, *statuses: NodeStatus) -> dict[tuple[str, str], Row]:
    return {(r.node, r.nf): r for r in tracker.update(samples(statuses))}


def test_rates_shares_and_errors_between_two_snapshots() -> None:
    tracker = RateTracker(span=3.0)
    first = rows_of(tracker, node(100.0, passed=1000, dropped=0))
    assert first[("edge-1", "fw")].packets_per_second is None
    rows = tracker.update(samples([node(102.0, passed=1300, dropped=100, errors=4)]))
    fw = next(r for r in rows if r.nf == "fw")
    assert fw.packets_per_second == 200.0 and fw.drops_per_second == 50.0
    assert fw.shares == {"passed": 0.75, "dropped": 0.25, "redirected": 0.0, "other": 0.0}
    assert fw.chain_errors_per_second == 2.0
    assert (fw.since, fw.until, fw.window) == (100.0, 102.0, 2.0)
    failed = next(r for r in rows if r.nf == "new")
    assert failed.state == "Failed" and failed.packets_per_second is None
    assert failed.error == "nfs/new/new.c:7 verifier refused"


def test_a_poll_without_a_newer_snapshot_keeps_the_last_figures() -> None:
    tracker = RateTracker(span=3.0)
    tracker.update(samples([node(100.0, 0, 0)]))
    tracker.update(samples([node(101.0, 50, 0)]))
    again = tracker.update(samples([node(101.0, 50, 0)]))
    assert next(r for r in again if r.nf == "fw").packets_per_second == 50.0


def test_the_window_spans_the_last_seconds_of_snapshots() -> None:
    tracker = RateTracker(span=3.0)
    for at, passed in ((100.0, 0), (101.0, 10), (102.0, 20), (103.0, 30), (104.0, 100)):
        rows = tracker.update(samples([node(at, passed, 0)]))
    fw = next(r for r in rows if r.nf == "fw")
    assert (fw.since, fw.until) == (101.0, 104.0)  # 100.0 fell out of the 3 s span
    assert fw.packets_per_second == 30.0


def test_monitor_mode_reads_the_would_be_verdicts() -> None:
    row = rate_row(
        samples([node(10.0, 0, 0, mode="monitor")])[("edge-1", "fw")],
        samples([node(12.0, 10, 90, mode="monitor")])[("edge-1", "fw")],
    )
    assert row.mode == "monitor" and row.drops_per_second == 45.0


def test_no_rate_across_a_reset_a_mode_switch_or_a_clock_going_back() -> None:
    def fw(status: NodeStatus) -> Sample:
        return samples([status])[("edge-1", "fw")]

    assert rate_row(fw(node(10, 500, 0)), fw(node(12, 100, 0))).packets_per_second is None
    switch = rate_row(fw(node(10, 500, 0, mode="monitor")), fw(node(12, 600, 0)))
    assert switch.packets_per_second is None
    tracker = RateTracker()
    tracker.update(samples([node(100.0, 0, 0)]))
    tracker.update(samples([node(102.0, 100, 0)]))
    back = tracker.update(samples([node(50.0, 120, 0)]))  # restarted agent, clock reset
    assert next(r for r in back if r.nf == "fw").packets_per_second is None


def test_select_filters_by_nf_and_sorts() -> None:
    tracker = RateTracker()
    tracker.update(samples([node(0, 0, 0, name="a"), node(0, 0, 0, name="b")]))
    rows = tracker.update(samples([node(1, 10, 90, name="a"), node(1, 200, 5, name="b")]))
    assert [(r.node, r.nf) for r in select(rows, "fw", "rate")] == [("b", "fw"), ("a", "fw")]
    assert [r.node for r in select(rows, "fw", "drops")] == ["a", "b"]
    by_nf = [(r.nf, r.node) for r in select(rows, None, "nf")]
    assert by_nf == [("fw", "a"), ("fw", "b"), ("new", "a"), ("new", "b")]
    # NFs without figures sort after those with figures
    assert [r.nf for r in select(rows, None, "rate")][-2:] == ["new", "new"]
