"""A fixed-rate UDP stream whose receiver counts sequence gaps: a second loss counter
next to `ping -f`, one that does not adapt its rate to replies.

Run as two processes in two namespaces (UdpStream does this):
    python -m benchmarks.udp_stream recv PORT
    python -m benchmarks.udp_stream send HOST PORT RATE
Each prints one JSON line when interrupted (SIGINT)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SEQ = struct.Struct("!Q")
REPO = Path(__file__).resolve().parent.parent


# Set by SIGINT. A flag, not an exception: an exception raised between sendto() and the
# count (or recv() and the record) would miscount the datagram in flight by one.
_stop = False


def _request_stop(*_: object) -> None:
    global _stop
    _stop = True


def receive(port: int) -> dict[str, int]:
    seen: set[int] = set()
    duplicates = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("0.0.0.0", port))
        sock.settimeout(0.05)  # to notice the stop flag while no datagram comes
        print("ready", flush=True)
        while not _stop:
            try:
                data = sock.recv(64)
            except TimeoutError:
                continue
            seq = SEQ.unpack_from(data)[0]
            if seq in seen:
                duplicates += 1
            seen.add(seq)
    highest = max(seen) if seen else -1
    return {
        "received": len(seen),
        "duplicates": duplicates,
        "gaps": highest + 1 - len(seen),  # sequence numbers below the highest never seen
    }


def send(host: str, port: int, rate: int) -> dict[str, int]:
    interval = 1.0 / rate
    sent = 0
    start = time.perf_counter()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        while not _stop:
            sock.sendto(SEQ.pack(sent).ljust(64, b"\0"), (host, port))
            sent += 1
            # fixed rate on an absolute schedule: a late wake-up is caught up, not lost
            delay = start + sent * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    return {"sent": sent, "rate_pps": rate}


class UdpStream:
    """Sender in one namespace, receiver in the other; stop() gives per-stream counts."""

    def __init__(self, send_ns: str, recv_ns: str, target: str, rate: int = 1000) -> None:
        port = 20000 + os.getpid() % 20000
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        base = [sys.executable, "-m", "benchmarks.udp_stream"]
        self.receiver = subprocess.Popen(
            ["ip", "netns", "exec", recv_ns, *base, "recv", str(port)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.receiver.stdout is not None
        if self.receiver.stdout.readline().strip() != "ready":
            raise RuntimeError("UDP receiver did not start")
        self.sender = subprocess.Popen(
            ["ip", "netns", "exec", send_ns, *base, "send", target, str(port), str(rate)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def stop(self) -> dict[str, Any]:
        self.sender.send_signal(signal.SIGINT)
        sent = json.loads(self.sender.communicate(timeout=30)[0])
        time.sleep(0.3)  # let the last datagrams arrive
        self.receiver.send_signal(signal.SIGINT)
        got = json.loads(self.receiver.communicate(timeout=30)[0].splitlines()[-1])
        return {**sent, **got, "lost": sent["sent"] - got["received"]}


def main() -> None:
    signal.signal(signal.SIGINT, _request_stop)
    if sys.argv[1] == "recv":
        result = receive(int(sys.argv[2]))
    else:
        result = send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
