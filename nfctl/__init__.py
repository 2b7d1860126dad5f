"""nfctl: a GitOps controller for eBPF network functions."""

__version__ = "0.1.0"
