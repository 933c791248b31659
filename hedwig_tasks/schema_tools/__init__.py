"""Tools about schemas as contracts: compatibility checks (``compat``, ``protobuf_compat``),
reading schemas from files or git (``sources``), and documentation (``asyncapi``, ``catalogue``).

:func:`check` compares two schemas of the same kind, whichever it is.
"""

from __future__ import annotations

from collections.abc import Sequence

from hedwig_tasks.exceptions import SchemaError
from hedwig_tasks.schema_tools.findings import BOTH, MODES, Finding, Report
from hedwig_tasks.schema_tools.sources import Loaded, load

__all__ = ["MODES", "Finding", "Loaded", "Report", "check", "check_loaded", "load"]


def check_loaded(old: Loaded, new: Loaded, *, mode: str = BOTH) -> Report:
    """Every change from ``old`` to ``new``; :class:`SchemaError` when they are not the same kind."""
    if mode not in MODES:
        raise SchemaError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if old.kind != new.kind:
        raise SchemaError(f"{old.name} is {old.kind} but {new.name} is {new.kind}: compare like with like")
    if old.kind == "json":
        from hedwig_tasks.schema_tools.compat import check_json

        return check_json(old.doc, new.doc, mode=mode)
    from hedwig_tasks.schema_tools.protobuf_compat import check_protobuf

    return check_protobuf(old.files, new.files, mode=mode)


def check(old: str, new: str, *, mode: str = BOTH, include: Sequence[str] = ()) -> Report:
    """Compare two schemas named as files or ``REV:PATH`` (see :func:`load`)."""
    return check_loaded(load(old, include=include), load(new, include=include), mode=mode)
