"""Publishing on the local transports behaves as on the cloud ones: nothing is provisioned by a publish.

A publish to a topic that does not exist fails, naming the topic and how to provision it; a
publish to a topic that exists but that no queue subscribes to is kept nowhere, and says so
in a warning, once per topic.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SCHEMA_FILE

from hedwig_tasks import Hedwig, PublishError
from hedwig_tasks.transports.base import Transport
from hedwig_tasks.transports.memory import MemoryTransport
from hedwig_tasks.transports.sqlite import SQLiteTransport


@pytest.fixture(params=["memory", "sqlite"])
def bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Transport]:
    transport: Transport = MemoryTransport() if request.param == "memory" else SQLiteTransport(tmp_path / "bus.db")
    yield transport
    transport.close()


def warnings_about(caplog: pytest.LogCaptureFixture, topic: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and f"topic {topic} " in r.getMessage() and "no subscriptions" in r.getMessage()
    ]


def test_publish_to_a_topic_nobody_provisioned_fails_and_says_how_to_provision(bus: Transport) -> None:
    app = Hedwig("users", schema=SCHEMA_FILE, transport=bus)
    with pytest.raises(PublishError) as caught:
        app.publish("user-created", "1.0", {"user_id": "U1"})
    assert "'user-created-v1' does not exist" in str(caught.value)
    assert "hedwig-tasks provision -A" in str(caught.value)
    assert "app.provision()" in str(caught.value)
    assert bus.provision(None, [], ["user-created-v1"], dry_run=True) == ["create topic user-created-v1"]
    with pytest.raises(PublishError, match="'user-created-v1' does not exist"):
        bus.publish_many("user-created-v1", [(b"{}", {})])


def test_a_topic_without_subscriptions_warns_once_per_topic(bus: Transport, caplog: pytest.LogCaptureFixture) -> None:
    bus.provision(None, [], ["lonely", "other"])
    bus.provision("q", ["busy"], [])
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            bus.publish("lonely", b"1", {})
        bus.publish_many("other", [(b"2", {}), (b"3", {})])
        bus.publish("other", b"4", {})
        bus.publish("busy", b"5", {})
    assert len(warnings_about(caplog, "lonely")) == 1
    assert len(warnings_about(caplog, "other")) == 1
    assert warnings_about(caplog, "busy") == []
    assert [s.depth for s in bus.status("q", ["busy", "lonely"])] == [1, 0]


def test_a_publisher_provisions_its_topics_and_consumers_subscribe(
    bus: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = Hedwig("users", schema=SCHEMA_FILE, transport=bus)
    consumer = Hedwig("billing", schema=SCHEMA_FILE, transport=bus)
    consumer.handler("user-created", "1.*")(lambda message: None)
    assert "create topic user-created-v1" in publisher.provision()
    with caplog.at_level(logging.WARNING):
        publisher.publish("user-created", "1.0", {"user_id": "kept nowhere"})
    assert len(warnings_about(caplog, "user-created-v1")) == 1

    assert consumer.provision() == ["subscribe billing to user-created-v1"]
    sent = publisher.publish("user-created", "1.0", {"user_id": "U2"})
    [delivery] = bus.consumer("billing", ["user-created-v1"]).receive(10, wait_s=0)
    assert delivery.attributes["hedwig_id"] == sent.id
