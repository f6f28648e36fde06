"""Fixtures: a real Kafka-protocol broker (Tansu) on a free port, shared by the session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def broker():
    from ponder.connectors.kafka.dev import DevBroker

    with DevBroker() as b:
        yield b.bootstrap
