"""`nfctl top`: a live table of the counters NFs export, per node and NF, as rates, scraped
from the agents' /metrics endpoints every interval."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Group
from rich.table import Table
from rich.text import Text

from nfctl.cli import exitcodes
from nfctl.cli.output import OutputFormat, console, emit_data, err_console

if TYPE_CHECKING:  # imported when used: every nfctl command loads this module
    from nfctl.top import Row, Scrape

SCRAPE_TIMEOUT = 2.0


def top(
    agents: list[str] = typer.Option(
        None, "--agent", "-a", help="an agent's metrics address host:port[=node] (repeatable)"
    ),
    targets: Path = typer.Option(
        None,
        "--targets",
        help="a Prometheus file_sd list of agents (deploy/monitoring/prometheus/targets)",
    ),
    nf: str = typer.Option(None, "--nf", help="only this NF"),
    sort: str = typer.Option("rate", "--sort", help="rate | node | nf"),
    interval: float = typer.Option(1.0, "--interval", min=0.2, help="seconds between samples"),
    once: bool = typer.Option(False, "--once", help="sample twice, print one table, exit"),
    output: OutputFormat = typer.Option(OutputFormat.TEXT, "--output", "-o"),
) -> None:
    """Live packets/s (and every other counter an NF exports) per node and NF, with the NF's
    state and revision. -o json|yaml implies --once."""
    from nfctl.top import SORT_KEYS

    if sort not in SORT_KEYS:
        err_console.print(f"--sort must be one of {', '.join(SORT_KEYS)}")
        raise typer.Exit(exitcodes.USAGE)
    endpoints = _endpoints(agents or [], targets)
    if not endpoints:
        err_console.print("name the agents: --agent host:port[=node] or --targets FILE")
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
    from nfctl.top import Scrape, parse

    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as response:
            text = response.read().decode()
    except (OSError, ValueError) as exc:
        return Scrape(node, time.monotonic(), {}, {}, error=f"{url}: {exc}")
    return parse(node, time.monotonic(), text)


def _rows(
    before: list[Scrape], after: list[Scrape], nf: str | None, sort: str
) -> tuple[list[Row], list[str]]:
    from nfctl.top import rates, select

    rows: list[Row] = []
    errors = [s.error for s in after if s.error]
    for old, new in zip(before, after, strict=True):
        if not new.error:
            rows += rates(old, new)
    return select(rows, nf, sort), errors


def _table(rows: list[Row], errors: list[str], interval: float) -> Group:
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
