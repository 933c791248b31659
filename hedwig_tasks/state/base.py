"""The state store's contract: the little shared state that lives beside the broker.

Periodic publishing (one leader among ``beat`` processes, the last published tick),
idempotent handlers (a key per message, held while it runs, recorded when done), fleet-wide
rate limits (one token bucket shared by every worker) and the live-worker registry (a
heartbeat row per worker) are all built from five small families of operations:

======================  ======================================================================
leases                  :meth:`~StateStore.acquire`, :meth:`~StateStore.renew`,
                        :meth:`~StateStore.release`, :meth:`~StateStore.holder`: a name held
                        by one owner until its expiry; anyone may take it once it expired
keys                    :meth:`~StateStore.set_if_absent`, :meth:`~StateStore.get`,
                        :meth:`~StateStore.put`, :meth:`~StateStore.delete`,
                        :meth:`~StateStore.compare_and_set`: strings with an optional TTL
counters                :meth:`~StateStore.incr`: a count over a fixed window
token buckets           :meth:`~StateStore.take`: ``rate_per_s`` tokens a second, up to ``burst``
heartbeats              :meth:`~StateStore.heartbeat`, :meth:`~StateStore.members`,
                        :meth:`~StateStore.forget`: rows in a group that expire unless renewed
======================  ======================================================================

Every operation is atomic on its own (one statement, one Lua script or one SQLite write
transaction), so any number of threads and processes may share a store. Names are free text;
a lease, a key and a counter of the same name are the same entry (use distinct prefixes such as
``beat/<app>/leader``). Heartbeat groups are separate from keys.

Time: every expiry is decided by one clock per store, :meth:`StateStore.now`, so two clients
whose own clocks disagree still agree on who holds a lease. Redis uses the server's time
(``PEXPIRE`` and ``TIME`` inside its scripts), PostgreSQL its ``now()``, SQLite the clock
the store was built with (``time.time`` unless a test injects one): SQLite's processes share
one machine, hence one clock. TTLs and windows are float seconds; Redis rounds them up to
whole milliseconds.

Every driver error becomes :class:`~hedwig_tasks.exceptions.StateError` at the store's
boundary, chained as ``__cause__``.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any, TypeVar

_S = TypeVar("_S", bound="StateStore")

__all__ = ["Lease", "Member", "StateStore", "check_bucket", "check_ttl", "encode_data", "refill"]


@dataclasses.dataclass(frozen=True)
class Lease:
    """Who holds a lease, and until when (epoch seconds on the store's clock)."""

    name: str
    owner: str
    expires_at: float


@dataclasses.dataclass(frozen=True)
class Member:
    """One live heartbeat row: its ``data`` as last sent, when (``seen``) and until when it lives."""

    group: str
    member: str
    data: Mapping[str, Any]
    seen: float
    expires_at: float


def check_ttl(ttl_s: float | None, what: str = "ttl_s", *, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``ttl_s`` is a positive, finite number of seconds (or None when optional)."""
    if ttl_s is None and optional:
        return
    if not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool) or not math.isfinite(ttl_s) or ttl_s <= 0:
        raise ValueError(f"{what} must be a positive number of seconds, got {ttl_s!r}")


def encode_data(data: Mapping[str, Any]) -> str:
    """The JSON text a heartbeat row stores; ``TypeError`` for data JSON cannot carry."""
    if not isinstance(data, Mapping):
        raise TypeError(f"heartbeat data must be a mapping, got {type(data).__name__}")
    return json.dumps(dict(data), separators=(",", ":"), sort_keys=True)


class StateStore(abc.ABC):
    """Leases, keys with a TTL, windowed counters, token buckets and heartbeat rows.

    Implementations: :class:`~hedwig_tasks.state.sqlite.SQLiteStore`,
    :class:`~hedwig_tasks.state.redis.RedisStore`,
    :class:`~hedwig_tasks.state.postgres.PostgresStore`; chosen by URL with
    :func:`hedwig_tasks.state.from_url`. Every method may raise ``StateError``.
    """

    #: The URL schemes this store is built from (``from_url``).
    schemes: tuple[str, ...] = ()

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str) -> StateStore:
        """Build the store a URL names; ``ConfigurationError`` for a bad option."""

    @abc.abstractmethod
    def now(self) -> float:
        """The store's time in epoch seconds: the clock every expiry is measured on."""

    # -- leases -----------------------------------------------------------------------------

    @abc.abstractmethod
    def acquire(self, name: str, owner: str, *, ttl_s: float) -> bool:
        """Take the lease ``name`` for ``owner`` for ``ttl_s`` seconds.

        True if it was free, expired or already ``owner``'s (then its expiry moves to now plus
        ``ttl_s``); False while another owner holds it.
        """

    @abc.abstractmethod
    def renew(self, name: str, owner: str, *, ttl_s: float) -> bool:
        """Extend ``owner``'s lease to now plus ``ttl_s``; False (nothing changed) unless ``owner`` holds it now.

        Unlike :meth:`acquire` it never takes a lease that expired: an owner that lost it learns so.
        """

    @abc.abstractmethod
    def release(self, name: str, owner: str) -> bool:
        """Give the lease up at once; False (nothing changed) unless ``owner`` held it."""

    @abc.abstractmethod
    def holder(self, name: str) -> Lease | None:
        """Who holds ``name`` now and until when; None when it is free or expired."""

    # -- keys -------------------------------------------------------------------------------

    @abc.abstractmethod
    def set_if_absent(self, key: str, value: str, *, ttl_s: float | None = None) -> bool:
        """Store ``value`` unless ``key`` exists (an expired key does not); True if stored."""

    @abc.abstractmethod
    def get(self, key: str) -> str | None:
        """The value of ``key``, or None when it is missing or expired."""

    @abc.abstractmethod
    def put(self, key: str, value: str, *, ttl_s: float | None = None) -> None:
        """Store ``value`` whatever was there; without ``ttl_s`` it never expires."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed (and had not expired)."""

    @abc.abstractmethod
    def compare_and_set(self, key: str, expected: str | None, value: str, *, ttl_s: float | None = None) -> bool:
        """Store ``value`` only if ``key`` holds ``expected`` now (None: only if it is absent); True if stored."""

    # -- counters and token buckets --------------------------------------------------------

    @abc.abstractmethod
    def incr(self, key: str, amount: int = 1, *, window_s: float) -> int:
        """Add ``amount`` to the count of ``key`` in its current window; returns the new count.

        The window opens at the first increment and closes ``window_s`` later (a fixed
        window): the next increment after that starts again from zero.
        """

    @abc.abstractmethod
    def take(self, bucket: str, *, rate_per_s: float, burst: float, tokens: float = 1.0) -> float:
        """Take ``tokens`` from a token bucket; 0.0 if taken, else the seconds to wait before they could be.

        The bucket holds at most ``burst`` tokens (it starts full) and refills at
        ``rate_per_s``; a refused take takes nothing. ``ValueError`` if ``tokens`` exceeds
        ``burst`` (it could never be granted). Every caller naming ``bucket`` shares it.
        """

    # -- heartbeats -------------------------------------------------------------------------

    @abc.abstractmethod
    def heartbeat(self, group: str, member: str, data: Mapping[str, Any], *, ttl_s: float) -> None:
        """Write ``member``'s row in ``group`` (JSON ``data``), alive until now plus ``ttl_s``."""

    @abc.abstractmethod
    def members(self, group: str) -> list[Member]:
        """The rows of ``group`` that have not expired, by member name; expired rows are removed."""

    @abc.abstractmethod
    def forget(self, group: str, member: str) -> bool:
        """Remove ``member``'s row at once (a clean shutdown); True if it was there."""

    # -- housekeeping -----------------------------------------------------------------------

    def sweep(self) -> int:
        """Delete expired entries now; returns how many (Redis expires its own: 0).

        SQLite and PostgreSQL also sweep on their own now and then, from a write.
        """
        return 0

    def close(self) -> None:  # noqa: B027 - a store without resources has nothing to close
        """Release connections; the store may not be used afterwards."""

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_bucket(rate_per_s: float, burst: float, tokens: float) -> None:
    """Raise ``ValueError`` for a bucket that makes no sense, or a take it could never grant."""
    check_ttl(rate_per_s, "rate_per_s")
    check_ttl(burst, "burst")
    check_ttl(tokens, "tokens")
    if tokens > burst:
        raise ValueError(f"taking {tokens} tokens from a bucket of burst {burst} could never succeed")


def refill(tokens: float, updated_at: float, now: float, *, rate_per_s: float, burst: float) -> float:
    """The tokens a bucket holds at ``now``, having held ``tokens`` at ``updated_at``."""
    return min(burst, tokens + max(0.0, now - updated_at) * rate_per_s)
