"""Hedwig's import path for messages: ``from hedwig_tasks.models import Message``.

This :class:`Message` is :class:`hedwig_tasks.message.Message` with Hedwig's ``publish()``:
``Message.new(type, version, data, headers=None).publish()`` publishes through the app built
from settings (see :mod:`hedwig_tasks.conf`), as Hedwig's own ``hedwig.models.Message`` does.
It lives here, not in :mod:`hedwig_tasks.message`, so that the message values stay a leaf that
imports neither the settings nor the app.
"""

from __future__ import annotations

import datetime as dt

from hedwig_tasks import message
from hedwig_tasks.app import Hedwig
from hedwig_tasks.conf import default_app
from hedwig_tasks.message import Metadata, Version

__all__ = ["Message", "Metadata", "Version"]


class Message(message.Message):
    """A Hedwig message that can publish itself, as ``hedwig.models.Message`` does."""

    def publish(
        self,
        app: Hedwig | None = None,
        *,
        delay_s: float | None = None,
        eta: dt.datetime | float | None = None,
        expires_s: float | None = None,
        expires_at: dt.datetime | float | None = None,
    ) -> message.Message:
        """Publish through ``app``, or, as in Hedwig, through the app built from settings.

        Returns the message as sent (with the app's publisher and default headers). Timing
        options as :meth:`Hedwig.publish <hedwig_tasks.app.Hedwig.publish>`. Raises
        ``ValidationError``, ``RoutingError``, ``PublishError`` or, with no app and no settings
        (or a bad timing option), ``ConfigurationError``.
        """
        target = app or default_app()
        return target.publish_message(self, delay_s=delay_s, eta=eta, expires_s=expires_s, expires_at=expires_at)
