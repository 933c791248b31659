"""Periodic schedules: when a message is due, as deterministic ticks.

A :class:`Schedule` publishes one message (a type, a version, fixed ``data``) at each tick of
either a cron expression in a time zone, or a fixed interval (``every``). A tick is a whole
epoch second; its message id (:meth:`Schedule.tick_id`) is derived from the app, the schedule's
name and the tick, so every ``beat`` process computes the same id for the same tick and a
tick published twice (a crash between publish and record) is a duplicate of one message id.

Cron (:class:`Cron`): five fields, ``minute hour day-of-month month day-of-week``, each ``*``, a
number, a range ``a-b``, a step ``*/n``, ``a-b/n`` or ``a/n``, or a list of those joined by
commas; months and weekdays may be named (``jan``-``dec``, ``sun``-``sat``; 0 and 7 are Sunday).
When both day fields are restricted a day matching either runs (as in Vixie cron); ``@hourly``,
``@daily`` (``@midnight``), ``@weekly``, ``@monthly`` and ``@yearly`` (``@annually``) are
understood. Times are wall-clock times in the schedule's zone: across a daylight-saving change
a time that does not exist that day is skipped, and a time that occurs twice runs once (the
first time).

``every`` ticks are multiples of the interval since the Unix epoch (so ``every=timedelta(hours=1)``
runs on the hour, UTC); the zone does not move them. Use cron for times of day in a zone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import uuid
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hedwig_tasks.exceptions import ConfigurationError

__all__ = ["TICK_NAMESPACE", "Cron", "Schedule"]

#: The namespace of the tick ids (uuid5 of ``"<app>/<schedule>/<tick>"``).
TICK_NAMESPACE = uuid.UUID("5b0c6a53-3f1e-4f45-9a57-0d1f3c7e9b21")

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: (name, lowest, highest, names) of the five fields.
_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February's most
_SEARCH_YEARS = 9  # a 29 February comes within 8 years


def _value(text: str, low: int, high: int, names: tuple[str, ...], field: str) -> int:
    lowered = text.lower()
    if lowered in names:
        return names.index(lowered) + low
    if not text.isdigit():
        raise ValueError(f"{text!r} in the {field} field is not a number" + (" or a name" if names else ""))
    number = int(text)
    if not low <= number <= high:
        raise ValueError(f"{number} is outside the {field} field's {low}-{high}")
    return number


def _field(text: str, low: int, high: int, names: tuple[str, ...], field: str) -> frozenset[int]:
    values: set[int] = set()
    for item in text.split(","):
        span, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(f"step {step_text!r} in the {field} field must be a whole number, 1 or more")
            step = int(step_text)
        if span == "*":
            first, last = low, high
        elif "-" in span:
            a, _, b = span.partition("-")
            first, last = _value(a, low, high, names, field), _value(b, low, high, names, field)
            if first > last:
                raise ValueError(f"range {span!r} in the {field} field runs backwards")
        else:
            first = _value(span, low, high, names, field)
            last = high if step_text else first  # "a/n" is "a-high/n"
        values.update(range(first, last + 1, step))
    return frozenset(values)


@dataclasses.dataclass(frozen=True)
class Cron:
    """A parsed five-field cron expression; :meth:`next_local` finds its next wall-clock time."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  #: 0 is Sunday
    any_day: bool  #: the day-of-month field is ``*``
    any_weekday: bool  #: the day-of-week field is ``*``

    @classmethod
    def parse(cls, text: str) -> Cron:
        """Read a cron expression; :class:`ConfigurationError` saying what is wrong and where."""
        fields = _MACROS.get(text.strip().lower(), text).split()
        if len(fields) != 5:
            raise ConfigurationError(
                f"cron {text!r}: expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"
            )
        try:
            parsed = [_field(f, lo, hi, names, name) for f, (name, lo, hi, names) in zip(fields, _FIELDS, strict=True)]
        except ValueError as exc:
            raise ConfigurationError(f"cron {text!r}: {exc}") from None
        weekdays = frozenset(d % 7 for d in parsed[4])
        minutes, hours, days, months, _ = parsed
        cron = cls(text, minutes, hours, days, months, weekdays, fields[2].startswith("*"), fields[4].startswith("*"))
        if cron.any_weekday and not any(min(cron.days) <= _DAYS_IN_MONTH[m - 1] for m in cron.months):
            raise ConfigurationError(f"cron {text!r}: no month of the year has that day")
        return cron

    def day_matches(self, day: dt.date) -> bool:
        in_month = day.day in self.days
        in_week = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def next_local(self, start: dt.datetime) -> dt.datetime:
        """The first naive wall-clock minute at or after ``start`` (a whole minute) that matches."""
        t, limit = start, start.year + _SEARCH_YEARS
        while t.year <= limit:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + dt.timedelta(days=32)).replace(day=1)
            elif not self.day_matches(t.date()):
                t = t.replace(hour=0, minute=0) + dt.timedelta(days=1)
            elif t.hour not in self.hours:
                t = t.replace(minute=0) + dt.timedelta(hours=1)
            elif t.minute not in self.minutes:
                t += dt.timedelta(minutes=1)
            else:
                return t
        raise ConfigurationError(f"cron {self.text!r} never runs")  # unreachable after parse's check


def _zone(tz: str | dt.tzinfo | None) -> dt.tzinfo:
    if tz is None:
        return dt.timezone.utc
    if isinstance(tz, dt.tzinfo):
        return tz
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(f"tz {tz!r}: not a time zone name such as 'Europe/Paris' or 'UTC'") from None


def _interval_s(every: dt.timedelta | float) -> int:
    seconds = every.total_seconds() if isinstance(every, dt.timedelta) else float(every)
    if not (seconds >= 1 and math.isfinite(seconds) and seconds == int(seconds)):
        raise ConfigurationError(f"every={every!r}: must be a whole number of seconds, 1 or more")
    return int(seconds)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One periodic message: what is published (type, version, data, headers) and when (cron or every).

    ``catch_up``: ticks missed while no ``beat`` ran are all published when one starts (True),
    or those older than the beat's grace are skipped (False, the default). Build it with
    :meth:`build` (or ``@hedwig.periodic(...)``), which checks every option.
    """

    name: str
    message_type: str
    version: str
    data: Mapping[str, Any]
    cron: Cron | None = None
    every_s: int | None = None
    tz: dt.tzinfo = dt.timezone.utc
    catch_up: bool = False
    headers: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(
        cls,
        message_type: str,
        version: str,
        *,
        name: str | None = None,
        cron: str | None = None,
        every: dt.timedelta | float | None = None,
        data: Mapping[str, Any] | None = None,
        tz: str | dt.tzinfo | None = None,
        catch_up: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> Schedule:
        """A checked schedule; :class:`ConfigurationError` for no or both of cron/every, a bad cron or zone."""
        if (cron is None) == (every is None):
            raise ConfigurationError(
                f"periodic {name or message_type!r}: give either cron='...' or every=timedelta(...)"
            )
        if tz is not None and every is not None:
            raise ConfigurationError("tz applies to cron schedules; every= ticks are multiples of it since the epoch")
        return cls(
            name=name or message_type,
            message_type=message_type,
            version=str(version),
            data=MappingProxyType(dict(data or {})),
            cron=None if cron is None else Cron.parse(cron),
            every_s=None if every is None else _interval_s(every),
            tz=_zone(tz),
            catch_up=catch_up,
            headers=MappingProxyType(dict(headers or {})),
        )

    def next_after(self, t: float) -> int:
        """The first tick strictly after epoch second ``t``."""
        if self.every_s is not None:
            return (math.floor(t) // self.every_s + 1) * self.every_s
        assert self.cron is not None
        local = dt.datetime.fromtimestamp(math.floor(t), self.tz).replace(tzinfo=None)
        start = local.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        while True:
            found = self.cron.next_local(start)
            epoch = dt.datetime(*found.timetuple()[:6], tzinfo=self.tz).timestamp()  # fold=0: the first
            exists = dt.datetime.fromtimestamp(epoch, self.tz).replace(tzinfo=None) == found
            if exists and epoch > t:
                return int(epoch)
            start = found + dt.timedelta(minutes=1)  # a time the change skipped, or already past

    def ticks(self, after: float, until: float) -> Iterator[int]:
        """Every tick in ``(after, until]``, in order."""
        tick = self.next_after(after)
        while tick <= until:
            yield tick
            tick = self.next_after(tick)

    def tick_id(self, app_name: str, tick: int) -> str:
        """The message id of this schedule's tick: the same in every process."""
        return str(uuid.uuid5(TICK_NAMESPACE, f"{app_name}/{self.name}/{tick}"))

    def describe(self) -> str:
        """``cron */5 * * * * (Europe/Paris)`` or ``every 300s``, for listings."""
        if self.cron is not None:
            return f"cron {self.cron.text} ({self.tz})"
        return f"every {self.every_s}s"
