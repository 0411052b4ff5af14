"""Round trip and TCP throughput across an emulated link (no ping or iperf needed).

    python probe.py serve PORT                       # in node 1: echo and sink, until killed
    python probe.py measure HOST PORT SECONDS        # in node 0: prints one JSON line

`measure` reports the median and minimum of 30 one-byte TCP round trips (TCP_NODELAY, so each
is one packet each way: 2·D plus the relay's and the stacks' time) and the TCP goodput of one
connection sending as fast as it can for SECONDS, counted until the receiver has confirmed every
byte (so data still queued in the link is not counted as delivered). Kept free of plait and
torch imports: it starts in milliseconds, run by path.
"""

from __future__ import annotations

import json
import socket
import statistics
import struct
import sys
import threading
import time


def _serve_one(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mode = conn.recv(1)
        if mode == b"e":  # echo each byte back
            while data := conn.recv(1):
                conn.sendall(data)
        elif mode == b"s":  # sink: count until the sender shuts down, then confirm the count
            total = 0
            while data := conn.recv(1 << 16):
                total += len(data)
            conn.sendall(struct.pack("!Q", total))


def serve(port: int) -> None:
    with socket.create_server(("0.0.0.0", port), reuse_port=False) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


def _connect(host: str, port: int, wait_s: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + wait_s
    while True:  # the server in the other node may still be starting
        try:
            s = socket.create_connection((host, port), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def measure(host: str, port: int, seconds: float) -> dict:
    with _connect(host, port) as s:
        s.sendall(b"e")
        rtts = []
        for _ in range(30):
            t0 = time.perf_counter()
            s.sendall(b"x")
            s.recv(1)
            rtts.append(time.perf_counter() - t0)
    out = {"rtt_ms_median": statistics.median(rtts) * 1e3, "rtt_ms_min": min(rtts) * 1e3}
    if seconds > 0:
        with _connect(host, port) as s:
            s.sendall(b"s")
            chunk = b"\0" * (1 << 16)
            sent, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                sent += s.send(chunk)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while len(reply) < 8 and (part := s.recv(8 - len(reply))):
                reply += part
            got = struct.unpack("!Q", reply)[0]
            dt = time.perf_counter() - t0
        out.update(tcp_mbit_s=got * 8 / dt / 1e6, tcp_bytes=got, tcp_s=dt)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))), flush=True)
