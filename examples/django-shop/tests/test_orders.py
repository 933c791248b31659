"""The shop's tests, with the hedwig-tasks pytest plugin: nothing reaches a transport."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from shop.orders import place_order

from hedwig_tasks.conf import default_app
from hedwig_tasks.testing import Published


def test_placing_an_order_publishes_it_on_commit(hedwig_published: Published) -> None:
    place_order("O1", "ann@example.com", 1250)
    hedwig_published.assert_published(
        "order-placed", data={"order_id": "O1", "email": "ann@example.com", "total_cents": 1250}, count=1
    )


def test_a_rolled_back_order_publishes_nothing(hedwig_published: Published) -> None:
    with pytest.raises(RuntimeError):
        place_order("O3", "cat@example.com", 400, fail=True)
    hedwig_published.assert_not_published("order-placed")


def test_an_order_gets_a_receipt(hedwig_eager: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shop")
    hedwig_eager(default_app())  # publishes run the handlers inline, after a full encode/decode
    place_order("O2", "bob@example.com", 900)
    assert "receipt for order O2 sent to bob@example.com" in caplog.messages
