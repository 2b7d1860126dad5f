"""Kernel side effects: bpf() syscalls, XDP/TC attachment, chains, pinned maps."""
