"""Helpers for the edge-hardening tests: raw WebSocket frames, JWTs, services with overrides."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jwt
import psutil
from support.processes import Service

TOKEN = "sec-" + "shared-token-for-edge-tests"
JWT_SECRET = "sec-" + "jwt-secret-for-edge-tests-0123456789"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def hs256(boards: list[str], *, ttl: float = 300, secret: str = JWT_SECRET, **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "edge-test", "boards": boards, "iat": now, "exp": int(now + ttl), **claims}
    return jwt.encode(body, secret, algorithm="HS256")


def memory_env(**overrides: str) -> dict[str, str]:
    """A service on the in-memory transport: no broker, quick to start."""
    return {
        "ADVANCED_ENVIRONMENT": "test",
        "ADVANCED_EVENT_TRANSPORT": "memory",
        "ADVANCED_REALTIME_TOKEN": TOKEN,
        "ADVANCED_AUTH_JWT_SECRET": JWT_SECRET,
        "ADVANCED_ALLOWED_ORIGINS": "https://app.example,http://localhost:5173",
        **overrides,
    }


@contextmanager
def running(kind: str, name: str, env: dict[str, str], timeout: float = 60) -> Iterator[Service]:
    service = Service(kind, env).start(name)
    try:
        service.wait_ready(timeout)
        yield service
    finally:
        service.stop()


def rss(service: Service) -> int:
    assert service.process is not None
    return int(psutil.Process(service.process.pid).memory_info().rss)


# --- raw WebSocket frames -------------------------------------------------------------------


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    masked: bool = True,
    announced_length: int | None = None,
) -> bytes:
    """One client frame, built by hand so that it can break the rules on purpose."""
    length = len(payload) if announced_length is None else announced_length
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


@dataclass
class ServerFrame:
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])


class RawSocket:
    """A WebSocket client on a plain TCP socket: handshake and frames written by hand."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in (headers or {}).items()),
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = self._read_until(b"\r\n\r\n")
        self.status_line, _, raw_headers = head.partition(b"\r\n")
        self.response_headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (
                line.decode("latin-1").partition(":") for line in raw_headers.split(b"\r\n")
            )
        }

    @property
    def upgraded(self) -> bool:
        return b" 101 " in self.status_line

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _read_exact(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_text(self, text: str | bytes) -> None:
        self.send(frame(OP_TEXT, text.encode() if isinstance(text, str) else text))

    def read_frame(self, timeout: float = 10) -> ServerFrame:
        self.sock.settimeout(timeout)
        first, second = self._read_exact(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._read_exact(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read_exact(8))[0]
        return ServerFrame(first & 0x0F, self._read_exact(length))

    def read_until_close(self, timeout: float = 10) -> tuple[list[ServerFrame], int | None]:
        """Every frame up to the server's close frame (or the end of the stream)."""
        deadline = time.monotonic() + timeout
        frames: list[ServerFrame] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no close within {timeout}s; got {frames[-3:]}")
            try:
                received = self.read_frame(remaining)
            except ConnectionError:
                return frames, None
            frames.append(received)
            if received.opcode == OP_CLOSE:
                return frames, received.close_code

    def closed_by_server(self, timeout: float = 10) -> bool:
        """True once the server has closed the TCP connection (reads hit EOF or a reset)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.sock.close()
