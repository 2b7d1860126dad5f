"""Turn NF C sources into verified, loadable (and optionally pinned) BPF programs via BCC."""
