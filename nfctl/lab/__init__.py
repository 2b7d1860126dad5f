"""A multi-node lab on one machine: network namespaces on a bridge."""
