"""`nfctl top`: a live table of the fleet from the controller, per node and NF: packets/s,
drops/s and verdict shares (from the NFs' verdict counters in node status), chain errors,
state and revision, refreshed every interval. `--agent`/`--targets` instead scrape agents'
/metrics for every counter an NF exports (nfctl/top_exports.py)."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from nfctl.cli import exitcodes
from nfctl.cli.fleet_cmd import CONN, Conn, _selector, fleet_stub, with_conn
from nfctl.cli.output import OutputFormat, console, emit_data, err_console

if TYPE_CHECKING:  # imported when used: every nfctl command loads this module
    from nfctl.top import RateTracker, Row
    from nfctl.top_exports import Row as ExportRow
    from nfctl.top_exports import Scrape

SCRAPE_TIMEOUT = 2.0
SPAN_SECONDS = 3.0  # rates over the agents' snapshots of about this long


@with_conn
def top(
    nf: str = typer.Option(None, "--nf", help="only this NF"),
    selector: str = typer.Option(None, "--selector", "-l", help="label selector k=v,..."),
    sort: str = typer.Option("rate", "--sort", help="rate | drops | node | nf"),
    interval: float = typer.Option(1.0, "--interval", min=0.2, help="seconds between samples"),
    once: bool = typer.Option(False, "--once", help="sample twice, print one table, exit"),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
    agents: list[str] = typer.Option(
        None,
        "--agent",
        "-a",
        help="scrape this agent's metrics host:port[=node] instead (repeatable): every "
        "counter the NFs export",
    ),
    targets: Path = typer.Option(
        None,
        "--targets",
        help="scrape a Prometheus file_sd list of agents (deploy/monitoring/prometheus/targets)",
    ),
    conn: Conn = CONN,
) -> None:
    """Live packets/s, drops/s and verdict shares per node and NF, with state and revision,
    from the controller. Rates are over the last ~3 s of status snapshots (agents report
    counters at each drift check, every 5 s by default: then over the last two); with
    --once, --interval must be longer than that. -o json|yaml implies --once."""
    if agents or targets:
        _top_exports(agents or [], targets, nf, sort, interval, once, output)
        return
    from nfctl.top import SORT_KEYS, RateTracker

    if sort not in SORT_KEYS:
        err_console.print(f"--sort must be one of {', '.join(SORT_KEYS)}")
        raise typer.Exit(exitcodes.USAGE)
    tracker = RateTracker(span=max(SPAN_SECONDS, 2 * interval))
    with fleet_stub(conn) as (stub, md):
        request = _request(selector)
        _poll(stub, md, request, tracker)
        if once or output is not OutputFormat.TEXT:
            time.sleep(interval)
            rows, errors = _poll(stub, md, request, tracker)
            rows = _select(rows, nf, sort)
            if output is not OutputFormat.TEXT:
                emit_data({"rows": [r.to_dict() for r in rows], "errors": errors}, output)
            else:
                console.print(_fleet_table(rows, errors, conn.address))
            return
        from rich.live import Live

        with Live(console=console, auto_refresh=False, screen=False) as live:
            try:
                while True:
                    time.sleep(interval)
                    rows, errors = _poll(stub, md, request, tracker)
                    table = _fleet_table(_select(rows, nf, sort), errors, conn.address)
                    live.update(table, refresh=True)
            except KeyboardInterrupt:
                pass


def _request(selector: str | None) -> Any:
    from nfctl.api.nfctl.v1 import nfctl_pb2 as pb

    return pb.ListNodesRequest(selector=_selector(selector, None))


def _poll(
    stub: Any, md: list[tuple[str, str]], request: Any, tracker: RateTracker
) -> tuple[list[Row], list[str]]:
    """One ListNodes: the rows, and the nodes whose status this nfctl cannot read."""
    from nfctl.top import samples
    from nfctl.wire.convert import status_from_proto

    statuses, errors = [], []
    for node in stub.ListNodes(request, metadata=md).nodes:
        try:
            statuses.append(status_from_proto(node.status))
        except ValueError as exc:
            errors.append(f"node {node.status.node}: status not understood: {exc}")
    return tracker.update(samples(statuses)), errors


def _select(rows: list[Row], nf: str | None, sort: str) -> list[Row]:
    from nfctl.top import select

    return select(rows, nf, sort)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _shares(row: Row) -> str:
    """pass/drop/redirect/other in percent of the window's packets."""
    if row.shares is None:
        return "-"
    return "/".join(
        f"{row.shares[v] * 100:.0f}" for v in ("passed", "dropped", "redirected", "other")
    )


def _fleet_table(rows: list[Row], errors: list[str], controller: str) -> Group:
    table = Table(
        show_edge=False,
        header_style="bold",
        caption=f"controller {controller}; rates over the agents' last status snapshots",
    )
    columns = ("NODE", "NF", "STATE", "MODE", "REVISION", "PKTS/s", "DROPS/s")
    for column in (*columns, "PASS/DROP/REDIR/OTHER %", "CHAIN ERR/s", "ERROR"):
        numeric = column in ("PKTS/s", "DROPS/s", "CHAIN ERR/s")
        table.add_column(column, justify="right" if numeric else "left")
    for r in rows:
        table.add_row(
            Text(r.node),
            Text(r.nf),
            Text(r.state),
            Text(r.mode),
            Text(r.revision[:12] or "-"),
            _rate(r.packets_per_second),
            _rate(r.drops_per_second),
            _shares(r),
            _rate(r.chain_errors_per_second),
            Text(r.error[:60], style="red") if r.error else "",
        )
    return Group(table, *(Text(escape(e), style="red") for e in errors))


# -- --agent / --targets: scrape the agents' /metrics -------------------------------------------
def _top_exports(
    agents: list[str],
    targets: Path | None,
    nf: str | None,
    sort: str,
    interval: float,
    once: bool,
    output: OutputFormat,
) -> None:
    from nfctl.top_exports import SORT_KEYS

    if sort not in SORT_KEYS:
        err_console.print(f"--sort must be one of {', '.join(SORT_KEYS)} with --agent/--targets")
        raise typer.Exit(exitcodes.USAGE)
    endpoints = _endpoints(agents, targets)
    if not endpoints:
        err_console.print(f"{targets}: no agents listed", markup=False)
        raise typer.Exit(exitcodes.USAGE)
    with ThreadPoolExecutor(max_workers=min(32, len(endpoints))) as pool:
        before = _scrape_all(pool, endpoints)
        if once or output is not OutputFormat.TEXT:
            time.sleep(interval)
            after = _scrape_all(pool, endpoints)
            rows, errors = _rows(before, after, nf, sort)
            if output is not OutputFormat.TEXT:
                emit_data({"rows": [r.to_dict() for r in rows], "errors": errors}, output)
            else:
                console.print(_table(rows, errors, interval))
            raise typer.Exit(exitcodes.UNAVAILABLE if len(errors) == len(endpoints) else 0)
        _live(pool, endpoints, before, nf, sort, interval)


def _live(
    pool: ThreadPoolExecutor,
    endpoints: list[tuple[str, str]],
    before: list[Scrape],
    nf: str | None,
    sort: str,
    interval: float,
) -> None:
    from rich.live import Live

    with Live(console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                after = _scrape_all(pool, endpoints)
                rows, errors = _rows(before, after, nf, sort)
                live.update(_table(rows, errors, interval), refresh=True)
                before = after
        except KeyboardInterrupt:
            pass


def _endpoints(agents: list[str], targets: Path | None) -> list[tuple[str, str]]:
    """(metrics URL, node name) of each agent."""
    out: list[tuple[str, str]] = []
    for item in agents:
        address, _, node = item.partition("=")
        out.append((_url(address), node or address))
    if targets is not None:
        try:
            groups = json.loads(targets.read_text())
        except (OSError, ValueError) as exc:
            err_console.print(f"{targets}: {exc}", markup=False)
            raise typer.Exit(exitcodes.USAGE) from None
        for group in groups:
            node = group.get("labels", {}).get("node")
            out += [(_url(t), node or t) for t in group.get("targets", [])]
    return out


def _url(address: str) -> str:
    return address if "://" in address else f"http://{address}/metrics"


def _scrape_all(pool: ThreadPoolExecutor, endpoints: list[tuple[str, str]]) -> list[Scrape]:
    return list(pool.map(lambda e: _scrape(*e), endpoints))


def _scrape(url: str, node: str) -> Scrape:
    from nfctl.top_exports import Scrape, parse

    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
            text = response.read().decode()
    except (OSError, ValueError) as exc:
        return Scrape(node, time.monotonic(), {}, {}, error=f"{url}: {exc}")
    return parse(node, time.monotonic(), text, wall=time.time())


def _rows(
    before: list[Scrape], after: list[Scrape], nf: str | None, sort: str
) -> tuple[list[ExportRow], list[str]]:
    from nfctl.top_exports import rates, select

    rows: list[ExportRow] = []
    errors = [s.error for s in after if s.error]
    for old, new in zip(before, after, strict=True):
        if not new.error:
            rows += rates(old, new)
    return select(rows, nf, sort), errors


def _table(rows: list[ExportRow], errors: list[str], interval: float) -> Group:
    table = Table(show_edge=False, header_style="bold", caption=f"rates over {interval:g}s")
    for column in ("NODE", "NF", "STATE", "REVISION", "COUNTER", "KEY", "RATE/s", "TOTAL"):
        table.add_column(column, justify="right" if column in ("RATE/s", "TOTAL") else "left")
    for r in rows:
        table.add_row(
            Text(r.node),
            Text(r.nf),
            Text(r.state),
            Text(r.revision[:12]),
            Text(r.metric.removeprefix("nfctl_nf_")),
            Text(r.key),
            f"{r.rate:,.1f}",
            f"{r.total:,.0f}",
        )
    return Group(table, *(Text(f"unreachable: {e}", style="red") for e in errors))
