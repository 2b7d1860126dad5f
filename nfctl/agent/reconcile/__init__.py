"""One reconcile pass in named phases, each with typed data in and out:

fetch (fetch.py) -> desired state (desired.py) -> builds needed and built (builds.py)
-> plan (plan.py, pure) -> apply (apply.py, the datapath executes the plan)
-> summarize results into events (summary.py, pure) -> node status (node_status.py, pure).

nfctl/agent/reconciler.py runs the phases in that order and keeps what carries over
between passes (state.py); ports.py names what it needs from Git and the datapath;
kernel.py adapts the real Datapath to that."""
