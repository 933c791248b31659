"""The Pub/Sub transport on Google's emulator: the shared contract, plus what only Pub/Sub shows."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest
from gcp_server import PROJECT, emulator_host, gcp, gcp_transport, tag  # noqa: F401
from google.api_core import exceptions as google_exceptions
from helpers import wait_for

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.testing.contract import ContractClock, Names, RealClock, TransportContract
from hedwig_tasks.transports import _gcp_consumer, from_url
from hedwig_tasks.transports.base import Delivery, Transport
from hedwig_tasks.transports.gcp import GooglePubSubTransport


class TestGooglePubSubTransport(TransportContract):
    """The emulator keeps time itself, in whole seconds: leases of 2 s (set on each pull)."""

    lease_s = 2.0
    quiet_s = 0.7
    deliver_timeout_s = 15.0
    at_least_once = True

    @pytest.fixture
    def clock(self) -> ContractClock:
        return RealClock()

    @pytest.fixture
    def transport(self, emulator_host: str) -> Iterator[GooglePubSubTransport]:
        transport = gcp_transport(emulator_host, lease_s=self.lease_s, publish_timeout_s=5.0)
        yield transport
        transport.close()

    def test_provision_dry_run_changes_nothing(self, transport: Transport, names: Names) -> None:
        """As the contract's, but receiving from a subscription not provisioned is a clear error."""
        transport.provision(names.third_queue, [names.topic], [])
        subscribe, publish = [names.topic], [names.topic, names.other_topic]
        planned = transport.provision(names.queue, subscribe, publish, dry_run=True)
        assert not any(line.startswith(f"create topic {names.topic}:") for line in planned)
        assert any(names.other_topic in line for line in planned)
        assert transport.provision(names.queue, subscribe, publish, dry_run=True) == planned
        with pytest.raises(PublishError):
            transport.publish(names.other_topic, b"x", {})
        transport.publish(names.topic, b"before the subscription", {})
        with pytest.raises(TransportError, match=f"hedwig-{names.queue}-{names.topic}.*run `hedwig-tasks provision`"):
            transport.consumer(names.queue, [names.topic]).receive(1, wait_s=0)
        assert transport.provision(names.queue, subscribe, publish) == planned
        self.assert_nothing(transport.consumer(names.queue, [names.topic]))

    def test_fan_out_gives_every_subscribed_queue_a_copy(self, transport: Transport, names: Names) -> None:
        """As the contract's, but a queue without a subscription to the topic gets an error, not silence."""
        first = self.subscribed(transport, names.queue, names.topic)
        second = self.subscribed(transport, names.other_queue, names.topic)
        elsewhere = self.subscribed(transport, names.third_queue, names.other_topic)
        bodies = self.publish(transport, names.topic, 3)
        assert sorted(d.body for d in self.receive(first, 3)) == bodies
        assert sorted(d.body for d in self.receive(second, 3)) == bodies
        self.assert_nothing(elsewhere)
        with pytest.raises(TransportError, match="not found"):
            transport.consumer(names.third_queue, [names.topic]).receive(10, wait_s=0)

    def test_status_is_none_but_checks_the_subscription(self, transport: GooglePubSubTransport, names: Names) -> None:
        self.subscribed(transport, names.queue, names.topic)
        (row,) = transport.status(names.queue, [names.topic])
        assert (row.subscription, row.topic) == (f"hedwig-{names.queue}-{names.topic}", names.topic)
        assert (row.depth, row.in_flight, row.dead_letters) == (None, None, None)
        with pytest.raises(TransportError, match="not found"):
            transport.status(names.queue, [names.other_topic])


# -- URLs, construction, names ----------------------------------------------------------------


def test_url_options() -> None:
    transport = from_url(
        "gcp://my-project?emulator=127.0.0.1:1&lease_s=2.5&max_delivery_attempts=7&publish_timeout_s=3"
        "&batch_max_messages=500&batch_max_bytes=2000000&batch_max_latency_s=0.05"
    )
    assert isinstance(transport, GooglePubSubTransport)
    assert (transport.project, transport.emulator, transport.lease_s) == ("my-project", "127.0.0.1:1", 2.5)
    assert (transport.max_delivery_attempts, transport.publish_timeout_s) == (7, 3.0)
    settings = transport.batch_settings
    assert (settings.max_messages, settings.max_bytes, settings.max_latency) == (500, 2000000, 0.05)
    assert transport.topic_path("orders") == "projects/my-project/topics/hedwig-orders"
    assert transport.topic_path("orders", "other-proj") == "projects/other-proj/topics/hedwig-orders"
    assert transport.subscription_name("myapp", "orders") == "hedwig-myapp-orders"
    assert transport.subscription_name("myapp") == "hedwig-myapp"
    assert transport.dlq_name("myapp") == "hedwig-myapp-dlq"


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("gcp://p?emulater=x&lease=3&lease_s=2", "unknown gcp option 'emulater'; did you mean emulator?"),
        ("gcp://p?lease_s=soon", "lease_s='soon'"),
        ("gcp://p?lease_s=0", "lease_s='0' must be a positive number of seconds"),
        ("gcp://p?lease_s=601", "at most 600"),
        ("gcp://p?max_delivery_attempts=2", "max_delivery_attempts must be 5 to 100"),
        ("gcp://p/path", "expected gcp://PROJECT"),
    ],
)
def test_bad_urls_are_refused(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        GooglePubSubTransport.from_url(url)
    assert complaint in str(caught.value)


def test_hedwig_settings_cross_project_names_and_no_secrets_in_repr() -> None:
    settings = {
        "GOOGLE_CLOUD_PROJECT": "my-project",
        "GOOGLE_APPLICATION_CREDENTIALS": "/secret/path/key.json",
        "HEDWIG_SUBSCRIPTIONS": ["orders", ("users", "their-project")],
        "PUBSUB_EMULATOR_HOST": "127.0.0.1:1",
    }
    transport = GooglePubSubTransport.from_settings(settings)
    assert transport.project == "my-project"
    assert transport.subscription_name("q", "orders") == "hedwig-q-orders"
    assert transport.subscription_name("q", "users") == "hedwig-q-their-project-users"
    assert repr(transport) == "<GooglePubSubTransport project='my-project' emulator='127.0.0.1:1'>"
    assert "secret" not in repr(transport)
    assert "secret" not in repr({k: v for k, v in vars(transport).items() if not k.startswith("_")})


def test_construction_does_no_io() -> None:
    transport = from_url("gcp://hedwig-test?emulator=127.0.0.1:1")
    assert isinstance(transport, GooglePubSubTransport)
    assert transport.consumer("lazy", ["t"]) is not None
    assert not transport.client.connected


# -- publishing --------------------------------------------------------------------------------


def test_limits_are_checked_before_sending(gcp: GooglePubSubTransport) -> None:
    queue, topic = f"q-{tag()}", f"t-{tag()}"
    gcp.provision(queue, [topic], [])
    consumer = gcp.consumer(queue, [topic])
    with pytest.raises(PublishError, match="101 attributes; Pub/Sub takes at most 100"):
        gcp.publish(topic, b"x", {f"h{i}": "v" for i in range(101)})
    with pytest.raises(PublishError, match="attribute 'big' is 1025 bytes"):
        gcp.publish(topic, b"x", {"big": "v" * 1025})
    with pytest.raises(PublishError, match="Pub/Sub takes at most 10000000"):
        gcp.publish(topic, b"x" * 10_000_001, {})
    with pytest.raises(PublishError, match="101 attributes"):  # one bad message: none of the batch is sent
        gcp.publish_many(topic, [(b"fine", {}), (b"bad", {f"h{i}": "v" for i in range(101)})])
    assert consumer.receive(10, wait_s=0.5) == []
    gcp.publish(topic, b"x", {f"h{i}": "v" * 1024 for i in range(100)})
    (delivery,) = consumer.receive(10, wait_s=5)
    assert len(delivery.attributes) == 100


def test_publish_to_a_missing_topic_names_it_and_says_how_to_provision(gcp: GooglePubSubTransport) -> None:
    topic = f"t-{tag()}"
    for publish in (
        lambda: gcp.publish(topic, b"x", {}),
        lambda: gcp.publish_many(topic, [(b"x", {}), (b"y", {})]),
        lambda: gcp.publish_async(topic, b"x", {}).result(timeout=30),
    ):
        with pytest.raises(PublishError) as caught:
            publish()
        assert f"publish to {topic!r} (projects/{PROJECT}/topics/hedwig-{topic})" in str(caught.value)
        assert "run `hedwig-tasks provision`" in str(caught.value)


# -- consuming ---------------------------------------------------------------------------------


def test_ack_is_sent_when_it_returns(gcp: GooglePubSubTransport, emulator_host: str) -> None:
    """The worker frees a slot when ack returns: by then Pub/Sub must have the acknowledgement.

    Right after ack, another client gives the same ack id back (deadline 0): an acknowledged
    message stays gone; one whose acknowledgement was still to be sent would come back at once.
    """
    queue, topic = f"q-{tag()}", f"t-{tag()}"
    gcp.provision(queue, [topic], [])
    consumer = gcp.consumer(queue, [topic])
    gcp.publish_many(topic, [(f"m{i}".encode(), {}) for i in range(3)])
    got: dict[str, Delivery] = {}
    wait_for(lambda: got.update((d.transport_id, d) for d in consumer.receive(3, wait_s=1)) or len(got) == 3, 30)
    consumer.ack(list(got.values()))
    other = gcp_transport(emulator_host)
    path = gcp.subscription_path(f"hedwig-{queue}-{topic}")
    ack_ids = [d.receipt.ack_id for d in got.values()]
    with contextlib.suppress(google_exceptions.GoogleAPIError):  # the emulator may refuse spent ack ids
        other.client.subscriber.modify_ack_deadline(subscription=path, ack_ids=ack_ids, ack_deadline_seconds=0)
    assert consumer.receive(10, wait_s=1.5) == []
    other.close()


def test_provisioning_the_same_names_at_once_from_many_processes_succeeds(emulator_host: str) -> None:
    # Each transport reads "not there" and creates: all but one creation meet AlreadyExists.
    import threading

    queue, topic = f"q-{tag()}", f"t-{tag()}"
    transports = [gcp_transport(emulator_host) for _ in range(6)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(transports))

    def provision(transport: GooglePubSubTransport) -> None:
        barrier.wait(10)
        try:
            transport.provision(queue, [topic], [topic])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=provision, args=(t,)) for t in transports]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for transport in transports:
        transport.close()
    assert errors == []


def test_a_delayed_publish_hops_to_the_apps_own_topic_and_comes_on_time(
    gcp: GooglePubSubTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delay longer than a subscription may hold a message is not deferred forever: past
    ``MAX_DEFER_AGE_S`` (here 0) an early message is republished to the app's own topic, and the
    copy that comes on time is handed out once, as a first attempt, without the not-before time."""
    monkeypatch.setattr(_gcp_consumer, "MAX_DEFER_AGE_S", 0.0)
    names = Names.fresh()
    gcp.provision(names.queue, [names.topic], [])
    consumer = gcp.consumer(names.queue, [names.topic])
    due = time.time() + 2.0
    gcp.publish(names.topic, b"later", {"n": "1"}, delay_s=2.0)
    found: list[Delivery] = []
    deadline = time.monotonic() + 20
    while not found and time.monotonic() < deadline:
        found = consumer.receive(10, wait_s=0.5)
    assert time.time() >= due
    delivery = found[0]
    assert (delivery.body, dict(delivery.attributes), delivery.attempt) == (b"later", {"n": "1"}, 1)
    assert delivery.subscription == f"hedwig-{names.queue}", "it came through the app's own topic"
    consumer.ack(found)
