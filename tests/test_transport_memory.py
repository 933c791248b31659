"""The in-process transport against the shared transport contract."""

from __future__ import annotations

import pytest

from hedwig_tasks.exceptions import PublishError
from hedwig_tasks.testing.contract import ContractClock, TransportContract
from hedwig_tasks.transports import from_url
from hedwig_tasks.transports.memory import MemoryTransport, reset_named_buses


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


def test_a_named_bus_is_shared_by_every_url_that_names_it() -> None:
    orders, emails = from_url("memory://shop-named"), from_url("memory://shop-named?lease_s=5")
    assert isinstance(emails, MemoryTransport) and (emails.name, emails.lease_s) == ("shop-named", 5.0)
    emails.provision("emails", ["order-placed"], [])
    orders.publish("order-placed", b"o-1", {"k": "v"})
    (delivery,) = emails.consumer("emails", ["order-placed"]).receive(10, 0)
    assert (delivery.body, dict(delivery.attributes)) == (b"o-1", {"k": "v"})
    assert from_url("memory://other-named").provision("emails", ["order-placed"], []) != []
    assert from_url("memory://").provision("emails", ["order-placed"], []) != []


def test_reset_empties_named_buses_in_place() -> None:
    before = from_url("memory://reset-named")
    before.provision("q", ["t"], [])
    before.publish("t", b"x", {})
    reset_named_buses()
    assert before.status("q", ["t"])[0].depth == 0
    with pytest.raises(PublishError, match="provision it first"):
        before.publish("t", b"y", {})
    after = from_url("memory://reset-named")
    after.provision("q", ["t"], [])
    before.publish("t", b"z", {})  # the transport built before the reset still meets the others
    assert [d.body for d in after.consumer("q", ["t"]).receive(10, 0)] == [b"z"]


def test_purge_and_select_dead_letters_by_id_leave_other_queues_alone() -> None:
    bus = MemoryTransport()
    bus.provision("q", ["t"], [])
    bus.provision("other", ["t"], [])
    for body in (b"a", b"b"):
        bus.publish("t", body, {})
    for queue in ("q", "other"):
        consumer = bus.consumer(queue, ["t"])
        for delivery in consumer.receive(10, 0):
            consumer.dead_letter(delivery, "bad")
    first, second = bus.dead_letters("q")
    assert bus.dead_letters("q", ids=[second.transport_id], limit=1) == [second]
    assert bus.purge_dead_letters("q", ids=[first.transport_id]) == 1
    assert bus.dead_letters("q") == [second]
    assert len(bus.dead_letters("other")) == 2
    assert bus.purge_dead_letters("q", limit=5) == 1 and bus.dead_letters("q") == []
