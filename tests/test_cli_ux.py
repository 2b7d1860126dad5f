"""What people expect of a CLI: shell completion that a real bash loads and uses, -o json|yaml
on the commands that print tables, and exit codes that mean the same thing everywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nfctl.cli import exitcodes

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Commands that print a table in text mode, by their words on the command line.
TABLE_COMMANDS = [
    ["status"],
    ["get", "nodes"],
    ["get", "functions"],
    ["get", "events"],
    ["get", "history"],
    ["events"],
    ["validate"],
    ["doctor"],
    ["diff"],
    ["top"],
    ["test"],
    ["teardown"],
    ["lab", "status"],
]


def nfctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_BIN / "nfctl"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        check=False,
    )


def bash_complete(words: list[str]) -> list[str]:
    """Load `nfctl completion bash` in a fresh bash and ask it to complete `words` (the last
    one being typed), as pressing TAB does."""
    bash = shutil.which("bash")
    assert bash, "bash is required"
    array = " ".join(f"'{w}'" for w in words)
    script = (
        'eval "$(nfctl completion bash)"\n'
        f"COMP_WORDS=({array}); COMP_CWORD={len(words) - 1}\n"
        "complete -p nfctl >/dev/null || exit 9\n"
        "_nfctl_completion nfctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


def test_bash_completes_subcommands_options_and_values() -> None:
    assert bash_complete(["nfctl", "ge"]) == ["get"]
    assert bash_complete(["nfctl", "get", ""]) == [
        "nodes",
        "node",
        "functions",
        "events",
        "history",
    ]
    assert "--output" in bash_complete(["nfctl", "get", "nodes", "--o"])
    assert bash_complete(["nfctl", "validate", "-o", ""]) == ["text", "json", "yaml"]
    assert bash_complete(["nfctl", "completion", ""]) == ["bash", "zsh", "fish"]


@pytest.mark.parametrize(
    ("shell", "registration"),
    [("zsh", "compdef _nfctl_completion nfctl"), ("fish", "complete --command nfctl")],
)
def test_zsh_and_fish_scripts_and_answers(shell: str, registration: str) -> None:
    """The zsh and fish scripts register nfctl and call it back with _NFCTL_COMPLETE; the
    answer to that call lists the subcommand being typed."""
    script = nfctl("completion", shell)
    assert script.returncode == 0 and registration in script.stdout
    assert f"_NFCTL_COMPLETE=complete_{shell}" in script.stdout
    answer = nfctl(
        env={
            "_NFCTL_COMPLETE": f"complete_{shell}",
            "_TYPER_COMPLETE_ARGS": "nfctl get fu",
            "_TYPER_COMPLETE_FISH_ACTION": "get-args",
        }
    )
    assert answer.returncode == 0 and "functions" in answer.stdout
    # one candidate, described by its whole first sentence (which mentions nodes)
    assert '"nodes":' not in answer.stdout
    assert not any(line.startswith("nodes\t") for line in answer.stdout.splitlines())
    assert "which failing and why." in answer.stdout


def test_unknown_shell_is_a_usage_error() -> None:
    proc = nfctl("completion", "tcsh")
    assert proc.returncode == exitcodes.USAGE and "tcsh" in proc.stderr


def test_help_documents_exit_codes() -> None:
    out = nfctl("--help").stdout
    assert "Exit codes: 0 ok; 1 checked and not ok" in " ".join(out.replace("│", " ").split())


def overview_rows(*group: str) -> dict[str, str]:
    """Command -> summary from the Commands panel of `nfctl [group] --help` at 200 columns,
    asserting that each command has exactly one row."""
    out = nfctl(*group, "--help").stdout
    end = out.index("Exit codes") if not group else len(out)
    panel = out[out.index("Commands") : end]
    rows = [line.strip("│ ╰─╯") for line in panel.splitlines()[1:]]
    firsts = [row.split()[0] for row in rows if row]
    assert len(firsts) == len(set(firsts)), (group, firsts)
    return {row.split()[0]: row.split(None, 1)[1] for row in rows if row}


def test_help_overview_gives_each_command_one_row() -> None:
    """At 200 columns every command's summary is one row of its group's overview: a
    docstring's own line breaks used to cut teardown's, top's, test's, `get node`'s and
    `rollout status`'s rows in the middle of a sentence."""
    from nfctl.cli.main import app

    commands = {info.name or info.callback.__name__ for info in app.registered_commands} | {
        group.name for group in app.registered_groups
    }
    summary = overview_rows()
    assert set(summary) == commands, summary
    assert summary["teardown"].endswith("of other tools stay."), summary["teardown"]
    assert summary["top"].endswith("from the controller."), summary["top"]
    groups: dict[str, dict[str, str]] = {}
    for group in app.registered_groups:
        assert group.typer_instance is not None and group.name is not None
        sub = group.typer_instance
        names = {info.name or info.callback.__name__ for info in sub.registered_commands}
        rows = groups[group.name] = overview_rows(group.name)
        assert set(rows) == names, (group.name, rows)
        assert all(row.endswith((".", ")")) for row in rows.values()), (group.name, rows)
    assert groups["get"]["node"].endswith("its link to the controller.")
    assert groups["rollout"]["status"].endswith("their nodes and gate results.")


@pytest.mark.parametrize("words", TABLE_COMMANDS, ids=" ".join)
def test_every_table_command_takes_output_json_and_yaml(words: list[str]) -> None:
    proc = nfctl(*words, "-o", "xml")
    message = " ".join(proc.stderr.replace("│", " ").split())
    assert proc.returncode == exitcodes.USAGE, proc.stderr
    assert "'xml' is not one of 'text', 'json', 'yaml'" in message, message


def test_exit_codes_usage_unavailable_and_not_ok(tmp_path: Path) -> None:
    assert nfctl("get", "nodes", "--no-such-flag").returncode == exitcodes.USAGE
    # nothing listens on port 1: the controller is unreachable
    proc = nfctl("get", "nodes", "--controller", "127.0.0.1:1", "--insecure")
    assert proc.returncode == exitcodes.UNAVAILABLE and "UNAVAILABLE" in proc.stderr
    # no agent runs for this state dir: nobody to ask
    proc = nfctl("reconcile", "--local", "--state-dir", str(tmp_path / "state"))
    assert proc.returncode == exitcodes.UNAVAILABLE and "no running agent" in proc.stderr
    # an invalid NF: checked, and the answer is no
    nf = tmp_path / "nfs" / "broken"
    nf.mkdir(parents=True)
    (nf / "nf.yaml").write_text("apiVersion: nfctl.io/v1alpha1\nkind: NetworkFunction\n")
    proc = nfctl("validate", str(tmp_path / "nfs"), "--no-compile", "-o", "yaml")
    assert proc.returncode == exitcodes.NOT_OK
    import yaml

    report = yaml.safe_load(proc.stdout)
    assert report["ok"] is False


def test_top_rates_from_two_scrapes_and_a_counter_reset() -> None:
    from nfctl.top_exports import parse, rates, select

    def scrape(at: float, passed: int, dropped: int) -> str:
        return (
            "# TYPE nfctl_nf_ratelimit_packets_total counter\n"  # as prometheus_client writes it
            f'nfctl_nf_ratelimit_packets_total{{nf="rl",map="stats",key="0"}} {passed}\n'
            f'nfctl_nf_ratelimit_packets_total{{nf="rl",map="stats",key="1"}} {dropped}\n'
            "# TYPE nfctl_agent_function_info gauge\n"
            'nfctl_agent_function_info{nf="rl",version="1.0.0",revision="abc",build="b",'
            'hook="xdp",state="Applied"} 1\n'
        )

    before = parse("edge-1", 10.0, scrape(10.0, 1000, 500))
    after = parse("edge-1", 12.0, scrape(12.0, 1400, 100))  # slot 1's map was recreated
    rows = select(rates(before, after), nf="rl", sort="rate")
    assert [(r.key, r.rate, r.state, r.revision) for r in rows] == [
        ("0", 200.0, "Applied", "abc"),
        ("1", 0.0, "Applied", "abc"),
    ]


def test_lab_status_of_a_lab_that_is_not_running_is_not_ok() -> None:
    proc = nfctl("lab", "status", "--tag", "ux2none", "-o", "json")
    assert proc.returncode == exitcodes.NOT_OK and "not running" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "words", [["get", "functions"], ["get", "events"], ["get", "history"], ["events"]], ids=" ".join
)
def test_every_controller_command_says_unavailable_with_3(words: list[str]) -> None:
    # nothing listens on port 1
    proc = nfctl(*words, "--controller", "127.0.0.1:1", "--insecure", "-o", "json")
    assert proc.returncode == exitcodes.UNAVAILABLE, proc.stderr
    assert proc.stdout == ""


def test_exit_codes_of_test_status_and_diff(tmp_path: Path) -> None:
    import json

    nf = tmp_path / "nfs" / "broken"
    nf.mkdir(parents=True)
    (nf / "nf.yaml").write_text("apiVersion: nfctl.io/v1alpha1\nkind: NetworkFunction\n")
    (nf / "tests.yaml").write_text("cases: [\n")
    # checked, and the answer is no: an NF that cannot be tested
    proc = nfctl("test", str(tmp_path / "nfs"), "-o", "json")
    assert proc.returncode == exitcodes.NOT_OK
    assert json.loads(proc.stdout)["ok"] is False
    # a node without status is not Ready
    proc = nfctl("status", "--state-dir", str(tmp_path / "state"), "-o", "json")
    assert proc.returncode == exitcodes.NOT_OK and "no agent status" in proc.stderr
    # a node state folder that does not exist is bad configuration
    proc = nfctl("diff", str(tmp_path / "nfs"), "--node-state", str(tmp_path / "nowhere"))
    assert proc.returncode == exitcodes.USAGE, proc.stdout + proc.stderr
