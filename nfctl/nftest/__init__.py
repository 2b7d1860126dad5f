"""Declarative packet tests for network functions (tests.yaml beside nf.yaml)."""
