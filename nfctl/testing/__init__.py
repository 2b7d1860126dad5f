"""Helpers shared by tests, benchmarks, doctor and the lab: throwaway network namespaces
with veth pairs, and traffic through them."""
