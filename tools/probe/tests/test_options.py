"""The probe's options: its defaults follow the same variables as the ingress's page, and what
it refuses it refuses with exit 3 (UNKNOWN), before connecting to anything."""

from __future__ import annotations

import socket

import pytest
from realtime_probe.cli import parse_options
from realtime_probe.report import EXIT_UNKNOWN, ProbeError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_probe_follows_the_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    # No ingress listens there, so the probe cannot ask it and falls back to the SSE port.
    ingress, gateway = free_port(), free_port()
    monkeypatch.delenv("ADVANCED_SSE_PUBLIC_URL", raising=False)
    monkeypatch.setenv("ADVANCED_INGRESS_PORT", str(ingress))
    monkeypatch.setenv("ADVANCED_SSE_PORT", str(gateway))
    options, _ = parse_options([])
    assert (options.ws_url, options.sse_url) == (
        f"ws://localhost:{ingress}",
        f"http://localhost:{gateway}",
    )
    monkeypatch.setenv("ADVANCED_SSE_PUBLIC_URL", "")  # the SSE routes on the ingress's port
    assert parse_options([])[0].sse_url == f"http://localhost:{ingress}"
    monkeypatch.setenv("ADVANCED_SSE_PUBLIC_URL", "https://events.example.com/")
    assert parse_options([])[0].sse_url == "https://events.example.com"


@pytest.mark.parametrize("board", ["no spaces", "x" * 65, "ok\n", ""])
def test_a_board_the_contract_refuses_is_refused_with_exit_3(
    board: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "ok\n": the `.match`-with-`$` drift accepted a trailing newline; the one rule does not.
    monkeypatch.setenv("ADVANCED_SSE_PUBLIC_URL", "http://localhost:1")
    with pytest.raises(ProbeError) as refused:
        parse_options(["--board", board])
    assert refused.value.code == EXIT_UNKNOWN and "is not a board id" in refused.value.message
