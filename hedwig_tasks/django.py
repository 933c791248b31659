"""Django integration: add ``"hedwig_tasks.django.HedwigTasksConfig"`` to ``INSTALLED_APPS``.

At start-up the app config builds the Hedwig app from Django settings (failing at once on a bad
setting, naming it) and imports the ``handlers`` and ``tasks`` modules of every installed app,
so handlers declared there with :func:`hedwig_tasks.conf.handler` are registered.
:func:`publish_on_commit` publishes a message only once the surrounding transaction commits.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

from django.apps import AppConfig, apps
from django.db import transaction

from hedwig_tasks.conf import default_app
from hedwig_tasks.message import Message

__all__ = ["HedwigTasksConfig", "publish_on_commit"]

logger = logging.getLogger(__name__)

#: Modules of installed apps imported at start-up so their handlers register.
DISCOVERED_MODULES = ("handlers", "tasks")


def _discover() -> list[str]:
    found = []
    for config in apps.get_app_configs():
        if not hasattr(config.module, "__path__"):  # a plain module has no submodules to find
            continue
        for leaf in DISCOVERED_MODULES:
            name = f"{config.name}.{leaf}"
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name)
                found.append(name)
    return found


class HedwigTasksConfig(AppConfig):  # type: ignore[misc]  # Django ships no type hints
    """Builds the default Hedwig app from Django settings and discovers handler modules."""

    name = "hedwig_tasks.django"
    label = "hedwig_tasks"
    verbose_name = "hedwig-tasks"

    def ready(self) -> None:
        app = default_app()
        modules = _discover()
        logger.debug("hedwig-tasks app %r ready; handler modules: %s", app.name, ", ".join(modules) or "none")


def publish_on_commit(message: Message, *, using: str | None = None) -> Message:
    """Validate ``message`` now and publish it when the current transaction commits.

    Outside a transaction it publishes at once. Raises ``ValidationError`` immediately for
    data that breaks the schema, so the caller learns before committing.
    """
    app = default_app()
    app.validator.encode(message, container=app.container)
    transaction.on_commit(lambda: app.publish_message(message), using=using)
    return message
