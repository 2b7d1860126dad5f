"""The node agent: Git -> desired state -> plan -> datapath, with status and events."""
