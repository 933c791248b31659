"""Flask integration: ``HedwigTasks(app)`` builds the Hedwig app from ``app.config``.

Inside that Flask app's context, ``Message.new(...).publish()`` and
:func:`hedwig_tasks.conf.default_app` use it.
"""

from __future__ import annotations

from typing import Any

from hedwig_tasks.app import Hedwig
from hedwig_tasks.conf import build_app
from hedwig_tasks.settings import HedwigSettings

__all__ = ["EXTENSION_KEY", "HedwigTasks"]

#: Where the extension registers itself in ``flask_app.extensions``.
EXTENSION_KEY = "hedwig_tasks"


class HedwigTasks:
    """The Flask extension. ``.app`` is the :class:`Hedwig` app its config describes."""

    def __init__(self, flask_app: Any = None) -> None:
        self.app: Hedwig | None = None
        if flask_app is not None:
            self.init_app(flask_app)

    def init_app(self, flask_app: Any) -> None:
        """Build the app from ``flask_app.config``; :class:`ConfigurationError` names a bad setting."""
        self.app = build_app(HedwigSettings.read(flask_app.config))
        flask_app.extensions[EXTENSION_KEY] = self
