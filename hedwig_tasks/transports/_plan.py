"""A provisioning plan as data: one :class:`Planned` record per resource that ``provision``
creates or changes. ``provision --dry-run`` prints their ``action``; ``provision --terraform``
(:mod:`hedwig_tasks.terraform`) renders the same records as Terraform resources."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Planned"]


@dataclass(frozen=True)
class Planned:
    """One resource: its ``kind`` (``sns_topic``, ``sqs_queue``, ``sqs_redrive``, ``sqs_policy``,
    ``sns_subscription``, ``pubsub_topic``, ``pubsub_subscription``), its ``name`` and the
    ``settings`` provision gives it, as sorted string pairs. ``action`` is the line a dry run
    prints; it takes no part in equality."""

    kind: str
    name: str
    settings: tuple[tuple[str, str], ...] = ()
    action: str = field(default="", compare=False)

    @classmethod
    def of(cls, kind: str, name: str, action: str, settings: Mapping[str, object] | None = None) -> Planned:
        """A record; ``settings`` values are kept as strings, None ones left out."""
        pairs = tuple(sorted((k, str(v)) for k, v in (settings or {}).items() if v is not None))
        return cls(kind, name, pairs, action)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The setting ``key``, or ``default``."""
        return dict(self.settings).get(key, default)
