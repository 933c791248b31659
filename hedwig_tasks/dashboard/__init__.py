"""``hedwig-tasks dashboard``: a page to watch an app's subscriptions, workers, dead letters and schemas.

See :mod:`hedwig_tasks.dashboard.server` for the stack and the security model, and
``docs/dashboard.md`` for what each page shows.
"""

from __future__ import annotations

from hedwig_tasks.dashboard.server import DEFAULT_HOST, DEFAULT_PORT, Dashboard

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Dashboard"]
