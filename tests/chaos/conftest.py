"""Fixtures of the fault tests. `edge_suite`: one worker, ingress and gateway shared by the
tests of a module (boots once: process start-up dominates the run time on a busy machine),
with small queues and retention so that the edge cases are reached quickly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from chaos.harness import EdgeSuite
from conftest import TOKEN
from support.brokers import Brokers, Names
from support.processes import Suite

EDGE_SETTINGS = {
    "ADVANCED_REPLAY_RETENTION": "300",
    "ADVANCED_SSE_SEND_QUEUE": "128",
    "ADVANCED_WEBSOCKET_SEND_QUEUE": "128",
    "ADVANCED_SSE_SEND_TIMEOUT_SECONDS": "2",
    "ADVANCED_RABBITMQ_MAX_RETRIES": "2",
    "ADVANCED_RABBITMQ_RETRY_DELAY_MS": "1500",
    "ADVANCED_WEBSOCKET_RATE_LIMIT": "1000/second",
    "ADVANCED_ACTIVITY_STREAM_RATE_LIMIT": "1000/minute",
    "ADVANCED_RATE_LIMIT_DEFAULT": "6000/minute",
}


@pytest.fixture(scope="module")
def edge_suite(request: pytest.FixtureRequest, brokers: Brokers) -> Iterator[EdgeSuite]:
    names = Names.fresh()
    env = {
        "ADVANCED_ENVIRONMENT": "test",
        "ADVANCED_REALTIME_TOKEN": TOKEN,
        "ADVANCED_RABBITMQ_URL": brokers.rabbitmq_url,
        "ADVANCED_REDIS_URL": brokers.redis_url,
        "ADVANCED_EVENT_TRANSPORT": "rabbitmq",
        "ADVANCED_PARTITION_LEASE_MS": "3000",
        **EDGE_SETTINGS,
        **names.env(),
    }
    suite = Suite(f"{request.module.__name__.rpartition('.')[2]}", env)
    try:
        started = [suite.start(kind, wait=False) for kind in ("worker", "ingress", "gateway")]
        for service in started:
            service.wait_ready(90)
        yield EdgeSuite(suite, names, brokers)
    finally:
        suite.stop_all()
        asyncio.run(names.cleanup(brokers))
