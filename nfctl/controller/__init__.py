"""The controller: fleet status, events and commands over gRPC, a webhook receiver."""
