"""The pieces every transport shares: URL options and the driver-error boundary."""

from __future__ import annotations

import pytest

from hedwig_tasks.exceptions import ConfigurationError, PublishError, TransportError
from hedwig_tasks.transports._boundary import boundary
from hedwig_tasks.transports._url import count, read_options, seconds, text

KNOWN = {"lease_s": seconds, "max_receive_count": count, "region": text}


def test_known_options_are_converted_and_the_last_repeat_wins() -> None:
    ours, others = read_options("aws", "lease_s=2.5&max_receive_count=3&region=a&region=b", KNOWN)
    assert ours == {"lease_s": 2.5, "max_receive_count": 3, "region": "b"}
    assert others == []


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("lease_s=0", "aws option lease_s='0' must be a positive number of seconds"),
        ("lease_s=soon", "aws option lease_s='soon' must be a positive number of seconds"),
        ("lease_s=inf", "aws option lease_s='inf' must be a positive number of seconds"),
        ("max_receive_count=2.5", "aws option max_receive_count='2.5' must be a whole number, 1 or more"),
        ("max_receive_count=0", "must be a whole number, 1 or more"),
        ("region=", "aws option region='' must not be empty"),
        ("lease=3", "unknown aws option 'lease'; did you mean lease_s? (known: lease_s, max_receive_count, region)"),
    ],
)
def test_a_bad_option_is_refused_naming_it(query: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        read_options("aws", query, KNOWN)
    assert complaint in str(raised.value)


def test_pass_on_keeps_the_drivers_own_options_in_order() -> None:
    ours, others = read_options("kombu", "heartbeat=10&lease_s=3&ssl=1", {"lease_s": seconds}, pass_on=True)
    assert ours == {"lease_s": 3.0}
    assert others == [("heartbeat", "10"), ("ssl", "1")]


def test_the_boundary_turns_driver_errors_into_ours_and_lets_ours_through() -> None:
    with pytest.raises(PublishError, match=r"^publishing to t failed: refused \(hint\)$") as raised:
        with boundary("publishing to t", (OSError,), error=PublishError, describe=lambda e: f"{e} (hint)"):
            raise ConnectionRefusedError("refused")
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    with pytest.raises(ConfigurationError), boundary("x", (Exception,)):
        raise ConfigurationError("ours, unchanged")
    with pytest.raises(KeyError), boundary("x", (OSError,)):
        raise KeyError("not the driver's")
    with pytest.raises(TransportError, match="reading q failed: gone"), boundary("reading q", (OSError,)):
        raise OSError("gone")
