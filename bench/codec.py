"""Encode+decode throughput of one small JSON message: hedwig-tasks against authedwig 11.

Both sides use the same schema file (``tests/schemas/schema.json``), type ``user-created``
1.1, data ``{"user_id": ...}`` and one header ``request_id``, in the same process. Each timed
iteration builds the message (a publish builds one), encodes it and decodes the result:

* hedwig-tasks: ``Message.new`` -> ``JSONSchemaValidator.encode`` -> ``decode``;
* authedwig: ``hedwig.models.Message.new`` -> ``.serialize()`` -> ``Message.deserialize``.
  Its ``serialize`` also decodes and validates the payload once more before returning; that is
  what a publish costs there, so it stays in.

Two forms: ``attributes`` (metadata in transport attributes) and ``container`` (metadata in
the body). Versions are built once outside the loop on both sides, as a publisher module's
constant would be. After a warm-up the two sides alternate for R rounds; the best round of
each side is the figure, and the median is reported beside it. Rounds are timed in CPU seconds
of this process (``time.process_time``): the codec is single-threaded and does no I/O, so on an
idle machine that equals wall time, and on a shared one it leaves out the time spent descheduled.

Usage: python bench/codec.py [--n 5000] [--rounds 5]
The human table goes to stderr; the last line on stdout is one JSON object with messages per
second per side and form, and ``ratio`` = hedwig-tasks / authedwig for each form.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hedwig_tasks.message import Message, Version
from hedwig_tasks.validators.jsonschema import JSONSchemaValidator

SCHEMA = Path(__file__).resolve().parent.parent / "tests" / "schemas" / "schema.json"
FORMS = ("attributes", "container")
MESSAGE_TYPE = "user-created"
PUBLISHER = "bench"

#: Iterations run by each side and form before the timed rounds.
DEFAULT_WARMUP = 500

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # authedwig imports distutils
    from distutils.version import StrictVersion

    import hedwig.models as legacy
    from hedwig.conf import settings as legacy_settings
    from hedwig.testing.config import unconfigure as legacy_unconfigure


def run_ours(validator: JSONSchemaValidator, n: int, *, container: bool) -> float:
    """Seconds for ``n`` build+encode+decode round trips through hedwig-tasks."""
    version = Version(1, 1)
    new, encode, decode = Message.new, validator.encode, validator.decode
    started = time.process_time()
    for _ in range(n):
        message = new(MESSAGE_TYPE, version, {"user_id": "U_1234"}, {"request_id": "r-1"}, publisher=PUBLISHER)
        encoded = encode(message, container=container)
        decoded = decode(encoded.body, encoded.attributes)
    elapsed = time.process_time() - started
    check(decoded.data, decoded.headers)
    return elapsed


def run_theirs(n: int) -> float:
    """Seconds for ``n`` build+serialize+deserialize round trips through authedwig, as configured."""
    version = StrictVersion("1.1")
    new, deserialize = legacy.Message.new, legacy.Message.deserialize
    started = time.process_time()
    for _ in range(n):
        message = new(MESSAGE_TYPE, version, {"user_id": "U_1234"}, headers={"request_id": "r-1"})
        payload, attributes = message.serialize()
        decoded = deserialize(payload, attributes, None)
    elapsed = time.process_time() - started
    check(decoded.data, decoded.headers)
    return elapsed


def check(data: Any, headers: Any) -> None:
    """Fail loudly if the last message did not round-trip, so a broken side never looks fast."""
    assert data == {"user_id": "U_1234"}, data
    assert headers.get("request_id") == "r-1", headers


@contextmanager
def legacy_form(*, container: bool) -> Iterator[None]:
    """authedwig configured for one form; its settings are global, so reset them afterwards."""
    legacy_unconfigure()
    legacy_settings.configure_with_object(
        {
            "HEDWIG_JSONSCHEMA_FILE": str(SCHEMA),
            "HEDWIG_PUBLISHER": PUBLISHER,
            "HEDWIG_USE_TRANSPORT_MESSAGE_ATTRIBUTES": not container,
            "HEDWIG_CALLBACKS": {},
            "HEDWIG_MESSAGE_ROUTING": {},
        }
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        legacy_unconfigure()


def measure(n: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per form and side, the seconds of every round; the sides alternate within each round."""
    validator = JSONSchemaValidator(SCHEMA)
    sides: dict[str, Callable[[int, bool], float]] = {
        "hedwig_tasks": lambda count, container: run_ours(validator, count, container=container),
        "authedwig": lambda count, container: run_theirs(count),
    }
    seconds: dict[str, dict[str, list[float]]] = {form: {side: [] for side in sides} for form in FORMS}
    for form in FORMS:
        container = form == "container"
        with legacy_form(container=container):
            for run in sides.values():
                run(DEFAULT_WARMUP, container)
            for index in range(rounds):
                # Alternate which side goes first, so neither always runs on a warmer cache.
                order = list(sides.items()) if index % 2 == 0 else list(reversed(sides.items()))
                for side, run in order:
                    seconds[form][side].append(run(n, container))
    return seconds


def summarise(n: int, seconds: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    result: dict[str, Any] = {"bench": "codec", "n": n, "rounds": len(seconds[FORMS[0]]["hedwig_tasks"])}
    for form, sides in seconds.items():
        best = {side: n / min(times) for side, times in sides.items()}
        median = {side: n / statistics.median(times) for side, times in sides.items()}
        result[form] = {
            "hedwig_tasks_per_s": round(best["hedwig_tasks"]),
            "authedwig_per_s": round(best["authedwig"]),
            "ratio": round(best["hedwig_tasks"] / best["authedwig"], 2),
            "hedwig_tasks_median_per_s": round(median["hedwig_tasks"]),
            "authedwig_median_per_s": round(median["authedwig"]),
            "ratio_median": round(median["hedwig_tasks"] / median["authedwig"], 2),
        }
    return result


def print_table(result: dict[str, Any]) -> None:
    print(f"codec: n={result['n']} x {result['rounds']} rounds, best round (median)", file=sys.stderr)
    print(f"{'form':11} {'hedwig-tasks msg/s':>24} {'authedwig msg/s':>24} {'ratio':>12}", file=sys.stderr)
    for form in FORMS:
        row = result[form]
        ours = f"{row['hedwig_tasks_per_s']:,} ({row['hedwig_tasks_median_per_s']:,})"
        theirs = f"{row['authedwig_per_s']:,} ({row['authedwig_median_per_s']:,})"
        ratio = f"{row['ratio']:.2f} ({row['ratio_median']:.2f})"
        print(f"{form:11} {ours:>24} {theirs:>24} {ratio:>12}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="round trips per side, form and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.n < 1 or args.rounds < 1:
        parser.error("--n and --rounds must be at least 1")
    result = summarise(args.n, measure(args.n, args.rounds))
    print_table(result)
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
