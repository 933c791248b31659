"""Hedwig's import path for messages: ``from hedwig_tasks.models import Message``.

``Message.new(type, version, data, headers=None).publish()`` publishes through the app built
from settings (see :mod:`hedwig_tasks.conf`), as Hedwig's own ``hedwig.models.Message`` does.
"""

from __future__ import annotations

from hedwig_tasks.message import Message, Metadata, Version

__all__ = ["Message", "Metadata", "Version"]
