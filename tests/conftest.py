"""Fixtures shared by the end-to-end, fault, browser and deploy tests."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Iterator

import pytest
from support.brokers import Brokers, Names, provide_brokers
from support.processes import Suite

TOKEN = "e2e-" + "token-for-tests"


BROKERS_USED: list[str] = []


@pytest.fixture(scope="session")
def brokers() -> Iterator[Brokers]:
    with provide_brokers(
        os.environ.get("ADVANCED_RABBITMQ_URL"), os.environ.get("ADVANCED_REDIS_URL")
    ) as found:
        rabbitmq = re.sub(r":[^:@/]+@", ":***@", found.rabbitmq_url)
        BROKERS_USED.append(f"{found.mode}: rabbitmq={rabbitmq} redis={found.redis_url}")
        yield found


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which brokers the broker tests ran against (testcontainers or configured)."""
    for line in BROKERS_USED:
        terminalreporter.write_line(f"[brokers] {line}")


@pytest.fixture
async def names(brokers: Brokers) -> AsyncIterator[Names]:
    fresh = Names.fresh()
    yield fresh
    await fresh.cleanup(brokers)


def suite_env(brokers: Brokers) -> dict[str, str]:
    """What every service started by a test gets, besides its unique names."""
    return {
        "ADVANCED_ENVIRONMENT": "test",
        "ADVANCED_REALTIME_TOKEN": TOKEN,
        "ADVANCED_RABBITMQ_URL": brokers.rabbitmq_url,
        "ADVANCED_REDIS_URL": brokers.redis_url,
        "ADVANCED_EVENT_TRANSPORT": "rabbitmq",
        "ADVANCED_RABBITMQ_RETRY_DELAY_MS": "300",
        "ADVANCED_PARTITION_LEASE_MS": "3000",
    }


@pytest.fixture
def suite(request: pytest.FixtureRequest, brokers: Brokers, names: Names) -> Iterator[Suite]:
    """Services started by the test share these brokers, unique names and the test token."""
    env = {**suite_env(brokers), **names.env()}
    running = Suite(re.sub(r"\W+", "-", request.node.name)[:60], env)
    yield running
    running.stop_all()
