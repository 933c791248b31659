"""pytest fixtures for code that publishes with hedwig-tasks; loaded by the ``pytest11`` entry point.

* ``hedwig_published``: a :class:`~hedwig_tasks.testing.Published` recording every publish of
  the test, which stays in the process (validated, encoded, never sent) unless the test is
  marked ``@pytest.mark.hedwig_passthrough`` or the block is inside ``published.passthrough()``.
* ``hedwig_eager``: call it with one or more apps to run their publishes inline for the test.
* Named in-process buses (``memory://NAME``) are emptied before and after every test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING

import pytest

from hedwig_tasks.testing import Published, eager, record_published, reset_memory_buses

if TYPE_CHECKING:
    from hedwig_tasks.app import Hedwig


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "hedwig_passthrough: hedwig_published records publishes and lets them reach the transport too"
    )


@pytest.fixture
def hedwig_published(request: pytest.FixtureRequest) -> Iterator[Published]:
    """Every message any app published during the test, kept in the process; see :class:`Published`."""
    passthrough = request.node.get_closest_marker("hedwig_passthrough") is not None
    with record_published(passthrough=passthrough) as published:
        yield published


@pytest.fixture
def hedwig_eager() -> Iterator[Callable[..., Hedwig]]:
    """Call with apps to run their publishes eagerly (inline, after a round trip) for this test."""
    with ExitStack() as stack:
        yield lambda app, *apps: stack.enter_context(eager(app, *apps))


@pytest.fixture(autouse=True)
def _hedwig_memory_buses() -> Iterator[None]:
    """Each test starts and ends with the named in-process buses empty."""
    reset_memory_buses()
    yield
    reset_memory_buses()
