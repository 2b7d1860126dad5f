"""Kernel side effects: XDP/TC attachment, chains, pinned programs and maps (the bpf()
wrapper below it is nfctl.bpf). Never compiles: building is nfctl.builder."""
