"""Where handlers run: the worker's own threads (the default) or child processes.

``hedwig-tasks worker --pool processes -c N`` runs handlers in N child processes, fed and
answered by one dispatcher thread of the worker (:mod:`~hedwig_tasks.pool.processes`; a child
as the worker sees it is :mod:`~hedwig_tasks.pool.children`); the child side is
:mod:`~hedwig_tasks.pool.child` and the bytes between them :mod:`~hedwig_tasks.pool.framing`.
The worker keeps receiving, leases, signals and settling either way.
"""

from __future__ import annotations

__all__ = ["POOLS"]

#: The pools a worker can run handlers in.
POOLS = ("threads", "processes")
