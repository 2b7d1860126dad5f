"""The wire contract between agent, controller and CLI: the status model, its conversions
to and from the protobuf messages, and the TLS channel helpers. It sits below all three
(it imports none of them), so none of them imports another for these."""
