"""The `nfctl` command line."""
