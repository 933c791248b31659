"""The in-process transport against the shared transport contract."""

from __future__ import annotations

import pytest

from hedwig_tasks.testing.contract import ContractClock, TransportContract
from hedwig_tasks.transports import from_url
from hedwig_tasks.transports.memory import MemoryTransport


class TestMemoryTransport(TransportContract):
    quiet_s = 0.05
    deliver_timeout_s = 2.0

    @pytest.fixture
    def transport(self, clock: ContractClock) -> MemoryTransport:
        return MemoryTransport(lease_s=self.lease_s, clock=clock)


def test_memory_url_builds_a_new_empty_bus() -> None:
    first, second = from_url("memory://"), from_url("memory://")
    assert isinstance(first, MemoryTransport)
    first.provision("q", ["t"], [])
    assert second.provision("q", ["t"], []) == ["create topic t", "subscribe q to t"]
