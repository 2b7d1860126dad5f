"""Progressive rollouts driven by the controller (see docs/rollouts.md)."""
