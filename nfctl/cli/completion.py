"""`nfctl completion bash|zsh|fish`: print the shell script that completes nfctl's commands
and options. The script calls `nfctl` back with _NFCTL_COMPLETE set; Click (inside Typer)
answers those calls once Typer's shell classes are registered (enable_shell_completion)."""

from __future__ import annotations

import os
from enum import StrEnum

import typer

PROG = "nfctl"
COMPLETE_VAR = "_NFCTL_COMPLETE"


class Shell(StrEnum):
    BASH = "bash"
    ZSH = "zsh"
    FISH = "fish"


def enable_shell_completion() -> None:
    # Only a completion request pays for the import; Typer's public switch for this
    # (add_completion) also adds --install-completion, which edits rc files unasked.
    if os.environ.get(COMPLETE_VAR):
        from typer._completion_classes import completion_init

        completion_init()


def completion(shell: Shell = typer.Argument(..., help="bash, zsh or fish")) -> None:
    """Print a shell completion script.

    bash: eval "$(nfctl completion bash)"   (or save it in /etc/bash_completion.d/nfctl)
    zsh:  nfctl completion zsh > "${fpath[1]}/_nfctl"
    fish: nfctl completion fish > ~/.config/fish/completions/nfctl.fish"""
    from typer._completion_shared import get_completion_script

    typer.echo(get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell))
