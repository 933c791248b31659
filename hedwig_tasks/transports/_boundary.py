"""Where a driver's errors become ours: the one boundary every transport wraps its calls in.

A transport names the exceptions its driver raises and, if it likes, how to describe one
(adding a hint such as "check the AWS credentials"); :func:`boundary` turns each into a
``TransportError`` (or the subclass asked for, such as ``PublishError``) that says what was
being done, chained to the driver's error. Our own errors pass through untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from hedwig_tasks.exceptions import HedwigError, TransportError

__all__ = ["boundary"]


@contextlib.contextmanager
def boundary(
    doing: str,
    catch: tuple[type[BaseException], ...],
    *,
    error: type[TransportError] = TransportError,
    describe: Callable[[BaseException], str] = str,
) -> Iterator[None]:
    """Raise ``error("<doing> failed: <description>")`` from any of ``catch`` raised inside."""
    try:
        yield
    except HedwigError:
        raise
    except catch as exc:
        raise error(f"{doing} failed: {describe(exc)}") from exc
