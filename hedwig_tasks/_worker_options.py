"""How a worker runs: :class:`WorkerOptions` and the defaults behind it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hedwig_tasks.exceptions import ConfigurationError
from hedwig_tasks.pool import POOLS

__all__ = ["WorkerOptions"]

#: Handler threads (or child processes with ``pool="processes"``).
DEFAULT_CONCURRENCY = 4
#: Deliveries held beyond those running.
DEFAULT_PREFETCH = 8
#: Longest a receive blocks waiting for messages, in seconds.
DEFAULT_WAIT_S = 1.0
#: Longest a delivery is kept leased in all, in seconds; then it is let go to be redelivered.
DEFAULT_MAX_LEASE_S = 3600.0
#: How long running handlers may finish after a stop request, in seconds.
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
#: Interval between writes of the worker's heartbeat row in the state store, in seconds.
DEFAULT_HEARTBEAT_S = 5.0


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """How a worker runs. ``topics`` limits consumption to some of the app's subscriptions.

    ``pool``: ``"threads"`` (the default) runs handlers on ``concurrency`` threads;
    ``"processes"`` in ``concurrency`` child processes, each built from ``app_spec``
    (``"module:attribute"``, as ``-A`` takes; by default where the app object is found among
    the imported modules) or from Hedwig settings in ``settings_spec``. A child is replaced
    after ``max_tasks_per_child`` messages, or once its peak memory (RSS) has passed
    ``max_memory_per_child_kb`` KiB after a message. ``time_limit_s`` is the limit of
    handlers that set none (None: no limit). ``heartbeat_s``: how often the worker's row in the
    state store is written, for ``hedwig-tasks inspect`` (None: no row).
    """

    concurrency: int = DEFAULT_CONCURRENCY
    prefetch: int = DEFAULT_PREFETCH
    topics: Sequence[str] | None = None
    burst: bool = False
    wait_s: float = DEFAULT_WAIT_S
    lease_s: float | None = None  #: what the lease keeper extends by; None: the transport's own lease
    max_lease_s: float = DEFAULT_MAX_LEASE_S
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    time_limit_s: float | None = None
    pool: str = "threads"
    app_spec: str | None = None
    settings_spec: str | None = None
    max_tasks_per_child: int | None = None
    max_memory_per_child_kb: int | None = None
    heartbeat_s: float | None = DEFAULT_HEARTBEAT_S

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be 1 or more, got {self.concurrency}")
        if self.prefetch < 0:
            raise ConfigurationError(f"prefetch must be 0 or more, got {self.prefetch}")
        if self.lease_s is not None and self.lease_s <= 0:
            raise ConfigurationError(f"lease_s must be more than 0, got {self.lease_s}")
        if self.wait_s < 0 or self.shutdown_timeout_s < 0:
            raise ConfigurationError("wait_s and shutdown_timeout_s must be 0 or more")
        if self.heartbeat_s is not None and not self.heartbeat_s > 0:
            raise ConfigurationError(f"heartbeat_s must be more than 0, got {self.heartbeat_s}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ConfigurationError(f"time_limit_s must be more than 0, got {self.time_limit_s}")
        if self.pool not in POOLS:
            raise ConfigurationError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        for name in ("max_tasks_per_child", "max_memory_per_child_kb"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigurationError(f"{name} must be 1 or more, got {value}")
        if self.pool == "threads" and (self.max_tasks_per_child or self.max_memory_per_child_kb):
            raise ConfigurationError("max_tasks_per_child and max_memory_per_child_kb need pool='processes'")
