"""pytest fixtures for code that publishes with hedwig-tasks; loaded by the ``pytest11`` entry point."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING

import pytest

from hedwig_tasks.testing import Published, eager, record_published

if TYPE_CHECKING:
    from hedwig_tasks.app import Hedwig


@pytest.fixture
def hedwig_published() -> Iterator[Published]:
    """Every message any app published during the test; see :class:`Published`."""
    with record_published() as published:
        yield published


@pytest.fixture
def hedwig_eager() -> Iterator[Callable[[Hedwig], Hedwig]]:
    """Call with an app to run its publishes eagerly (inline, after a round trip) for this test."""
    with ExitStack() as stack:
        yield lambda app: stack.enter_context(eager(app))
