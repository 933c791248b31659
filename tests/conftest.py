from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SCHEMA_FILE = Path(__file__).parent / "schemas" / "schema.json"


@contextlib.contextmanager
def authedwig_settings(**overrides: Any) -> Iterator[Any]:
    """Configure authedwig 11 (PyPI ``authedwig``) for one block, then reset it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from hedwig.conf import settings
        from hedwig.testing.config import unconfigure

    unconfigure()
    values = {
        "HEDWIG_JSONSCHEMA_FILE": str(SCHEMA_FILE),
        "HEDWIG_PUBLISHER": "legacy-service",
        "HEDWIG_USE_TRANSPORT_MESSAGE_ATTRIBUTES": True,
        "HEDWIG_CALLBACKS": {},
        "HEDWIG_MESSAGE_ROUTING": {},
        **overrides,
    }
    settings.configure_with_object(values)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield settings
    finally:
        unconfigure()


@pytest.fixture
def schema_file() -> Path:
    return SCHEMA_FILE
