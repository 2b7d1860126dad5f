"""The operator token listener (TLS without client certificates) before authentication:
a client without the token gets at most the stream limit on a connection and a capped number
of connections, and its calls are refused at once instead of being queued or held.

Raw HTTP/2 over TLS (hyperframe + hpack), so the client can do what a hostile one would:
ignore the advertised limit and never finish its requests."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hpack
import pytest
from hyperframe.frame import (
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from nfctl.controller.grpc_servers import OPERATOR_LISTENER_LIMITS
from tests.loopback_controller import free_port, make_pki, running_controller

pytestmark = pytest.mark.e2e

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REFUSED_STREAM = 0x7
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
WATCH_EVENTS = "/nfctl.v1.FleetService/WatchEvents"


@dataclass
class RawH2:
    """One HTTP/2 connection; records what the server answers on each stream."""

    sock: ssl.SSLSocket
    encoder: hpack.Encoder = field(default_factory=hpack.Encoder)
    decoder: hpack.Decoder = field(default_factory=hpack.Decoder)
    settings: dict[int, int] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)
    grpc_status: dict[int, str] = field(default_factory=dict)
    goaway: bool = False
    buffer: bytes = b""
    next_stream: int = 1

    @classmethod
    def connect(cls, port: int, ca: Path) -> RawH2:
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn = cls(context.wrap_socket(raw, server_hostname="localhost"))
        conn.sock.sendall(PREFACE + SettingsFrame(0).serialize())
        deadline = time.monotonic() + 10
        while not conn.settings and time.monotonic() < deadline:
            conn.read(0.5)
        assert conn.settings, "no SETTINGS from the server"
        conn.sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
        return conn

    def open_call(self, path: str) -> int:
        """HEADERS of a gRPC call, without a request body or END_STREAM."""
        stream = self.next_stream
        self.next_stream += 2
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        frame = HeadersFrame(stream, data=self.encoder.encode(headers), flags=["END_HEADERS"])
        self.sock.sendall(frame.serialize())
        return stream

    def read(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                return
            if not data:
                return
            self.buffer += data
            while len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                self.buffer = self.buffer[9 + length :]
                self._handle(frame)

    def _handle(self, frame: Frame) -> None:
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            self.settings.update(frame.settings)
        elif isinstance(frame, RstStreamFrame) and frame.error_code == REFUSED_STREAM:
            self.refused.add(frame.stream_id)
        elif isinstance(frame, HeadersFrame):
            for name, value in self.decoder.decode(frame.data):
                if name in (b"grpc-status", "grpc-status"):
                    text = value.decode() if isinstance(value, bytes) else value
                    self.grpc_status[frame.stream_id] = text
        elif isinstance(frame, GoAwayFrame):
            self.goaway = True
        elif isinstance(frame, WindowUpdateFrame):
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def operator_port(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "token").write_text("operator-token-1\n")
    port = free_port()
    with running_controller(
        tmp_path,
        pki,
        f"127.0.0.1:{free_port()}",
        "--operator-listen",
        f"127.0.0.1:{port}",
        "--operator-token-file",
        str(tmp_path / "token"),
    ):
        yield port, pki / "ca.crt"


def test_unauthenticated_connection_gets_at_most_the_stream_limit(
    operator_port: tuple[int, Path],
) -> None:
    port, ca = operator_port
    conn = RawH2.connect(port, ca)
    try:
        limit = conn.settings.get(SettingsFrame.MAX_CONCURRENT_STREAMS)
        assert limit is not None and limit <= 100, conn.settings
        # health checks need no token: held open (no request body) they fill the limit
        held = [conn.open_call(HEALTH_CHECK) for _ in range(limit)]
        conn.read(2.0)
        assert not conn.refused & set(held) and not conn.goaway
        extra = [conn.open_call(WATCH_EVENTS) for _ in range(20)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not set(extra) <= conn.refused:
            conn.read(0.5)
        assert set(extra) <= conn.refused, (limit, sorted(conn.refused), conn.grpc_status)
    finally:
        conn.close()


def test_calls_without_token_are_refused_at_once(operator_port: tuple[int, Path]) -> None:
    """Requests never finished by the client are answered UNAUTHENTICATED (16) anyway: no
    handler waits for their message, no call waits in the server's queue."""
    port, ca = operator_port
    conn = RawH2.connect(port, ca)
    try:
        calls = [conn.open_call(WATCH_EVENTS) for _ in range(8)]
        calls += [conn.open_call("/nfctl.v1.FleetService/ListNodes") for _ in range(4)]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not set(calls) <= set(conn.grpc_status):
            conn.read(0.5)
        assert {conn.grpc_status.get(c) for c in calls} == {"16"}, conn.grpc_status
    finally:
        conn.close()


def test_unauthenticated_connections_are_capped(operator_port: tuple[int, Path]) -> None:
    """Past the listener's connection cap, new TLS handshakes are refused (the cap is what
    an attacker without the token can hold, whatever the number of sockets it opens)."""
    port, ca = operator_port
    cap = dict(OPERATOR_LISTENER_LIMITS)["grpc.max_allowed_incoming_connections"]
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    held: list[ssl.SSLSocket] = []
    refused = 0
    try:
        for _ in range(cap + 20):
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                conn = context.wrap_socket(raw, server_hostname="localhost")
                conn.sendall(PREFACE + SettingsFrame(0).serialize())
                held.append(conn)
            except (OSError, ssl.SSLError):
                raw.close()
                refused += 1
        assert len(held) <= cap and refused >= 20, (len(held), refused)
    finally:
        for conn in held:
            conn.close()
