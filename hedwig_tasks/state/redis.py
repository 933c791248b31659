"""The Redis state store.

Features
    Every operation of the contract in one command or one Lua script, so it is atomic on the
    server. Keys expire on their own (``PX``/``PEXPIRE``); heartbeat rows live in a hash per group
    with a sorted set of their expiries, pruned by every listing.

Connection string
    ``redis://[:password@]host:6379/db`` or ``rediss://...`` (TLS); redis-py's own query options
    pass through (``socket_timeout``, ``ssl_cert_reqs``, ...).

Options (query string)
    ``prefix`` (put before every key; default ``hedwig:state:``): one prefix per fleet sharing
    a database.

Time
    The server's: expiries are ``PEXPIRE`` and the scripts read ``TIME``, so clients whose clocks
    disagree still agree on every expiry. TTLs are rounded up to whole milliseconds.

Layout
    ``<prefix>k:<key>`` a string (keys, leases holding their owner, counters),
    ``<prefix>b:<bucket>`` a hash ``tokens``/``at``, ``<prefix>m:<group>`` a hash member ->
    ``"<seen ms> <json>"`` and ``<prefix>mx:<group>`` a sorted set member -> expiry in ms.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import redis
import redis.exceptions

from hedwig_tasks.exceptions import ConfigurationError, StateError
from hedwig_tasks.state.base import Lease, Member, StateStore, check_bucket, check_ttl, encode_data
from hedwig_tasks.transports._redis_client import mask
from hedwig_tasks.transports._url import Option, read_options, text

__all__ = ["DEFAULT_PREFIX", "RedisStore"]

#: Put before every key the store writes.
DEFAULT_PREFIX = "hedwig:state:"
#: Seconds a reply may take before the connection counts as broken.
DEFAULT_SOCKET_TIMEOUT_S = 5.0

_OPTIONS: dict[str, Option] = {"prefix": text}

_NOW_MS = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"

ACQUIRE = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""
HOLDER = (
    _NOW_MS
    + """
local v = redis.call('GET', KEYS[1])
if not v then return false end
return {v, redis.call('PTTL', KEYS[1]), now}
"""
)
# ARGV: has_expected (0/1), expected, value, ttl_ms ('' for none)
COMPARE_AND_SET = """
local v = redis.call('GET', KEYS[1])
if ARGV[1] == '0' then
  if v then return 0 end
elseif v ~= ARGV[2] then
  return 0
end
if ARGV[4] == '' then redis.call('SET', KEYS[1], ARGV[3]) else redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4]) end
return 1
"""
INCR = """
local v = redis.call('GET', KEYS[1])
if v and not string.match(v, '^-?%d+$') then return redis.error_reply('not a count') end
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return n
"""
# ARGV: rate per s, burst, tokens wanted. Returns the wait in seconds as text ('0' when taken).
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local held = burst
if s[1] then held = math.min(burst, tonumber(s[1]) + math.max(0, now - tonumber(s[2])) * rate) end
if held < want then return tostring((want - held) / rate) end
local left = held - want
redis.call('HSET', KEYS[1], 'tokens', tostring(left), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(((burst - left) / rate + 1) * 1000))
return '0'
"""
# KEYS: rows hash, expiries zset. ARGV: member, json, ttl_ms
HEARTBEAT = (
    _NOW_MS
    + """
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], now .. ' ' .. ARGV[2])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
"""
)
MEMBERS = (
    _NOW_MS
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #dead do
  redis.call('HDEL', KEYS[1], dead[i])
  redis.call('ZREM', KEYS[2], dead[i])
end
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf', 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  local v = redis.call('HGET', KEYS[1], live[i])
  if v then
    table.insert(out, live[i])
    table.insert(out, live[i + 1])
    table.insert(out, v)
  end
end
return out
"""
)
FORGET = (
    _NOW_MS
    + """
local expires = redis.call('ZSCORE', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if expires and tonumber(expires) > now then return 1 end
return 0
"""
)

_SCRIPTS = {
    "acquire": ACQUIRE,
    "renew": RENEW,
    "release": RELEASE,
    "holder": HOLDER,
    "compare_and_set": COMPARE_AND_SET,
    "incr": INCR,
    "take": TAKE,
    "heartbeat": HEARTBEAT,
    "members": MEMBERS,
    "forget": FORGET,
}


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisStore(StateStore):
    """The contract on one Redis database; the client is made on first use in each process."""

    schemes = ("redis", "rediss")

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX) -> None:
        parts = urlsplit(url)
        if parts.scheme not in self.schemes:
            raise ConfigurationError(f"expected redis://host:port/db or rediss://..., got {mask(url)!r}")
        self.url = url
        self.prefix = prefix
        self._client: redis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._pid = 0
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> RedisStore:
        """``redis://host:port/db?prefix=...``; other query options go to redis-py."""
        parts = urlsplit(url)
        options, others = read_options(parts.scheme, parts.query, _OPTIONS, pass_on=True)
        driver_url = urlunsplit(parts._replace(query=urlencode(others)))
        return cls(driver_url, prefix=options.get("prefix", DEFAULT_PREFIX))

    def __repr__(self) -> str:
        return f"<RedisStore {mask(self.url)!r} prefix={self.prefix!r}>"

    # -- the boundary -----------------------------------------------------------------------

    def _connect(self) -> redis.Redis:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                client = redis.Redis.from_url(
                    self.url, socket_timeout=DEFAULT_SOCKET_TIMEOUT_S, socket_connect_timeout=DEFAULT_SOCKET_TIMEOUT_S
                )
                self._scripts = {name: client.register_script(lua) for name, lua in _SCRIPTS.items()}
                self._client, self._pid = client, os.getpid()
            return self._client

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except redis.exceptions.ResponseError as exc:
            if "not a count" in str(exc):
                raise StateError(f"the key holds something that is not a count: use another name ({exc})") from exc
            raise StateError(f"state store {mask(self.url)}: {exc}") from exc
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StateError(f"state store {mask(self.url)}: {exc}") from exc

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        client = self._connect()
        with self._errors():
            return self._scripts[script](keys=keys, args=args, client=client)

    def _key(self, key: str) -> str:
        return f"{self.prefix}k:{key}"

    def now(self) -> float:
        client = self._connect()
        with self._errors():
            seconds, micros = client.time()
        return float(seconds) + float(micros) / 1_000_000

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            client.close()

    # -- leases -----------------------------------------------------------------------------

    def acquire(self, name: str, owner: str, *, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        return bool(self._run("acquire", [self._key(name)], [owner, _ms(ttl_s)]))

    def renew(self, name: str, owner: str, *, ttl_s: float) -> bool:
        check_ttl(ttl_s)
        return bool(self._run("renew", [self._key(name)], [owner, _ms(ttl_s)]))

    def release(self, name: str, owner: str) -> bool:
        return bool(self._run("release", [self._key(name)], [owner]))

    def holder(self, name: str) -> Lease | None:
        found = self._run("holder", [self._key(name)], [])
        if not found:
            return None
        owner, ttl_ms, now_ms = found
        expires_at = math.inf if int(ttl_ms) < 0 else (int(now_ms) + int(ttl_ms)) / 1000
        return Lease(name, owner.decode(), expires_at)

    # -- keys -------------------------------------------------------------------------------

    def set_if_absent(self, key: str, value: str, *, ttl_s: float | None = None) -> bool:
        check_ttl(ttl_s, optional=True)
        client = self._connect()
        with self._errors():
            return bool(client.set(self._key(key), value, nx=True, px=None if ttl_s is None else _ms(ttl_s)))

    def get(self, key: str) -> str | None:
        client = self._connect()
        with self._errors():
            value = client.get(self._key(key))
        return None if value is None else value.decode()

    def put(self, key: str, value: str, *, ttl_s: float | None = None) -> None:
        check_ttl(ttl_s, optional=True)
        client = self._connect()
        with self._errors():
            client.set(self._key(key), value, px=None if ttl_s is None else _ms(ttl_s))

    def delete(self, key: str) -> bool:
        client = self._connect()
        with self._errors():
            return bool(client.delete(self._key(key)))

    def compare_and_set(self, key: str, expected: str | None, value: str, *, ttl_s: float | None = None) -> bool:
        check_ttl(ttl_s, optional=True)
        args = [0 if expected is None else 1, expected or "", value, "" if ttl_s is None else _ms(ttl_s)]
        return bool(self._run("compare_and_set", [self._key(key)], args))

    # -- counters and buckets ---------------------------------------------------------------

    def incr(self, key: str, amount: int = 1, *, window_s: float) -> int:
        check_ttl(window_s, "window_s")
        return int(self._run("incr", [self._key(key)], [int(amount), _ms(window_s)]))

    def take(self, bucket: str, *, rate_per_s: float, burst: float, tokens: float = 1.0) -> float:
        check_bucket(rate_per_s, burst, tokens)
        wait = self._run("take", [f"{self.prefix}b:{bucket}"], [repr(rate_per_s), repr(burst), repr(tokens)])
        return float(wait)

    # -- heartbeats -------------------------------------------------------------------------

    def _group(self, group: str) -> list[str]:
        return [f"{self.prefix}m:{group}", f"{self.prefix}mx:{group}"]

    def heartbeat(self, group: str, member: str, data: Mapping[str, Any], *, ttl_s: float) -> None:
        check_ttl(ttl_s)
        self._run("heartbeat", self._group(group), [member, encode_data(data), _ms(ttl_s)])

    def members(self, group: str) -> list[Member]:
        found = self._run("members", self._group(group), [])
        rows = []
        for i in range(0, len(found), 3):
            seen_ms, _, text = found[i + 2].decode().partition(" ")
            rows.append(
                Member(group, found[i].decode(), json.loads(text), int(seen_ms) / 1000, float(found[i + 1]) / 1000)
            )
        return sorted(rows, key=lambda m: m.member)

    def forget(self, group: str, member: str) -> bool:
        return bool(self._run("forget", self._group(group), [member]))
