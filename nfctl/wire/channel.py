"""Client channels to the controller: mutual TLS with the fleet's CA (or server-only TLS
for enrolment and token-authenticated operators), plaintext only when asked for."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

ChannelOptions = Sequence[tuple[str, Any]]


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS verified against `ca` (the system roots without it); with cert and key, the
    client certificate that says who is calling (a node or an operator)."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def open_channel(
    target: str,
    *,
    insecure: bool,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    options: ChannelOptions = (),
) -> grpc.Channel:
    """A channel to `target`; the files are read now, so a renewed certificate is used by
    the next channel opened."""
    if insecure:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, channel_credentials(ca, cert, key), options=options)
