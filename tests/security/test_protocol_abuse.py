"""Protocol-level abuse through a raw TCP socket, frames written by hand.

Each abuse must end promptly with the right close code (or a timeout), keep the server's memory
bounded, and leave a bystander connection on the same instance working.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import orjson
import pytest
from security.edge_client import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    TOKEN,
    RawSocket,
    frame,
    rss,
)
from support.processes import Service

pytestmark = [pytest.mark.e2e]

MB = 1024 * 1024
PROBE = orjson.dumps({"type": "probe", "payload": {}})


def open_board(service: Service, board: str = "abuse", **headers: str) -> RawSocket:
    raw = RawSocket(service.port, f"/ws/boards/{board}?token={TOKEN}", headers)
    assert raw.upgraded, raw.status_line
    return raw


def reply_kind(raw: RawSocket) -> dict[str, object]:
    """The next data frame's JSON (pings from the server are answered on the way; presence
    frames, the board's other sockets coming and going, are skipped)."""
    while True:
        received = raw.read_frame()
        if received.opcode == OP_PING:
            raw.send(frame(OP_PONG, received.payload))
            continue
        assert received.opcode == OP_TEXT, received
        reply: dict[str, object] = orjson.loads(received.payload)
        if reply.get("kind") != "presence":
            return reply


def assert_bystander_fine(service: Service) -> None:
    bystander = open_board(service, "bystander")
    try:
        bystander.send_text(PROBE)
        assert reply_kind(bystander)["kind"] == "ack"
    finally:
        bystander.close()


def close_code(raw: RawSocket, timeout: float = 10) -> int | None:
    _, code = raw.read_until_close(timeout)
    return code


def test_fragmented_frames_with_an_interleaved_ping_are_reassembled(ingress: Service) -> None:
    raw = open_board(ingress)
    try:
        raw.send(frame(OP_TEXT, PROBE[:5], fin=False))
        raw.send(frame(OP_PING, b"mid-message"))  # control frames may interleave (RFC 6455 5.4)
        raw.send(frame(OP_CONT, PROBE[5:12], fin=False))
        raw.send(frame(OP_CONT, PROBE[12:], fin=True))
        pong = raw.read_frame()
        assert (pong.opcode, pong.payload) == (OP_PONG, b"mid-message")
        assert reply_kind(raw)["kind"] == "ack"
    finally:
        raw.close()


@pytest.mark.parametrize(
    ("name", "frames", "code"),
    [
        # A new data frame while a fragmented message is open: protocol error.
        ("interleaved data", [frame(OP_TEXT, b'{"ty', fin=False), frame(OP_TEXT, PROBE)], 1002),
        # A continuation with no message to continue.
        ("orphan continuation", [frame(OP_CONT, PROBE)], 1002),
        # A text frame that is not UTF-8.
        ("invalid utf-8", [frame(OP_TEXT, b'{"type":"x","payload":{"t":"\xc3\x28\xff"}}')], 1007),
        # Clients must mask every frame (RFC 6455 5.1).
        ("unmasked", [frame(OP_TEXT, PROBE, masked=False)], 1002),
        # A header announcing 2**62 bytes: refused on the header, nothing buffered.
        ("huge length", [frame(OP_TEXT, b"", announced_length=1 << 62)], 1009),
        (
            "huge fragmented",
            [frame(OP_TEXT, b"x" * 5000, fin=False), frame(OP_CONT, b"x" * 5000)],
            1009,
        ),
        # A control frame may not be fragmented nor exceed 125 bytes.
        ("fragmented ping", [frame(OP_PING, b"p", fin=False)], 1002),
        ("long ping", [frame(OP_PING, b"p" * 126)], 1002),
        ("reserved opcode", [frame(0x3, b"?")], 1002),
        ("reserved bits", [bytes([0xF1]) + frame(OP_TEXT, PROBE)[1:]], 1002),
    ],
)
def test_malformed_frames_are_closed_with_the_right_code(
    ingress: Service, name: str, frames: list[bytes], code: int
) -> None:
    raw = open_board(ingress)
    try:
        for data in frames:
            raw.send(data)
        assert close_code(raw) == code, name
        assert raw.closed_by_server(10), name
    finally:
        raw.close()
    assert_bystander_fine(ingress)


def test_a_binary_frame_gets_an_error_and_the_socket_stays(ingress: Service) -> None:
    raw = open_board(ingress)
    try:
        raw.send(frame(OP_BINARY, PROBE))
        reply = reply_kind(raw)
        assert reply["kind"] == "error" and reply["code"] == "invalid_message"
        raw.send_text(PROBE)
        assert reply_kind(raw)["kind"] == "ack"
    finally:
        raw.close()


def test_a_ping_flood_is_closed_with_1008(ingress: Service) -> None:
    before = rss(ingress)
    raw = open_board(ingress)
    try:
        raw.send(b"".join(frame(OP_PING, b"x" * 125) for _ in range(2000)))
        frames, code = raw.read_until_close(10)
        assert code == 1008
        pongs = [f for f in frames if f.opcode == OP_PONG]
        assert len(pongs) <= 50  # ADVANCED_WEBSOCKET_MAX_PINGS: no pong past the limit
    finally:
        raw.close()
    assert rss(ingress) - before < 20 * MB
    assert_bystander_fine(ingress)


def test_a_client_that_answers_no_ping_is_dropped(ingress: Service) -> None:
    """A client that stops reading (and so never answers a ping): ping every 2 s, 3 s to
    answer, then close 1011 and the TCP connection is gone."""
    raw = open_board(ingress)
    try:
        started = time.monotonic()
        frames, code = raw.read_until_close(15)  # reads, but never answers the pings
        assert code == 1011, frames
        assert any(f.opcode == OP_PING for f in frames)
        assert raw.closed_by_server(5)
        assert 3 < time.monotonic() - started < 12
    finally:
        raw.close()


def test_a_websocket_handshake_that_never_completes_is_cut(ingress: Service) -> None:
    with socket.create_connection(("127.0.0.1", ingress.port), timeout=15) as sock:
        sock.sendall(
            f"GET /ws/boards/slow?token={TOKEN} HTTP/1.1\r\nHost: x\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n".encode()
        )
        started = time.monotonic()
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received.startswith(b"HTTP/1.1 408"), received[:60]
    assert time.monotonic() - started < 10
    assert_bystander_fine(ingress)


def test_a_close_handshake_that_the_client_never_answers_ends(ingress: Service) -> None:
    raw = open_board(ingress, board="bad%20id")  # the server closes 4400 at once
    try:
        _, code = raw.read_until_close(10)
        assert code == 4400
        # We never echo the close: the server drops the TCP connection on its own after its
        # close-handshake timeout (4 s; uvicorn's own is 10 s).
        started = time.monotonic()
        assert raw.closed_by_server(15)
        assert time.monotonic() - started < 8
    finally:
        raw.close()


def test_a_client_that_stops_reading_is_aborted_with_bounded_memory(
    untrusting_ingress: Service,
) -> None:
    """No message limit on this ingress and a 2 s write-stall rule: a client that floods junk
    frames (each answered with an error) and never reads is aborted, memory stays bounded."""
    service = untrusting_ingress
    before = rss(service)
    raw = RawSocket.__new__(RawSocket)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window: fills fast
    sock.connect(("127.0.0.1", service.port))
    raw.sock, raw.buffer = sock, b""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    sock.sendall(
        (
            f"GET /ws/boards/stall?token={TOKEN} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert b" 101 " in raw._read_until(b"\r\n\r\n")
    # Each junk frame costs the server an error reply that echoes nothing but is ~150 bytes;
    # a 128-character id makes each reply bigger than the frame that caused it.
    junk = frame(OP_TEXT, orjson.dumps({"id": "i" * 128, "type": "BAD"}))
    outcome: dict[str, object] = {}

    def flood() -> None:
        sent = 0
        try:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                sock.sendall(junk * 200)
                sent += 200
        except OSError as exc:  # the server aborted the connection
            outcome["error"] = exc
        outcome["sent"] = sent
        outcome["at"] = time.monotonic()

    started = time.monotonic()
    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    thread.join(45)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a sendall still blocked
    sock.close()
    assert "error" in outcome, (
        f"the server kept the connection open after {outcome.get('sent')} frames"
    )
    assert float(outcome["at"]) - started < 40  # type: ignore[arg-type]
    grown = rss(service) - before
    assert grown < 40 * MB, f"the server grew by {grown / MB:.1f} MiB"
    assert_bystander_fine(service)
    # The aborted socket is no longer counted.
    deadline = time.monotonic() + 10
    while "advanced_websocket_connections 0.0" not in httpx.get(f"{service.url}/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_close_frame_is_echoed_promptly(ingress: Service) -> None:
    raw = open_board(ingress)
    try:
        raw.send(frame(OP_CLOSE, b"\x03\xe8bye"))
        _, code = raw.read_until_close(10)
        assert code == 1000
    finally:
        raw.close()
