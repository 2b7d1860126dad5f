"""The exit codes every nfctl command uses (listed in `nfctl --help`)."""

from __future__ import annotations

OK = 0  # done; the result is good (valid, Ready, no difference)
NOT_OK = 1  # done, and the answer is "no": invalid NF, node not Ready, changes pending
USAGE = 2  # bad flags, arguments or configuration (Click uses 2 for usage errors too)
UNAVAILABLE = 3  # the controller was unreachable or refused; no running agent to ask
UNAPPROVED = 4  # `agent --once` under a rollout policy: no approved revision; nothing changed

HELP = (
    "Exit codes: 0 ok; 1 checked and not ok (invalid NF, node not Ready, `diff` found "
    "changes); 2 bad usage or configuration; 3 controller unreachable or refused the "
    "request, or no running agent to ask (reconcile --local); 4 `agent --once` under a "
    "rollout policy had no approved revision to apply (the node stayed where it was)."
)
