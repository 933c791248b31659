"""A provisioning plan as data: one :class:`Planned` record per resource that ``provision``
creates or changes. ``provision --dry-run`` prints their ``action``; ``provision --terraform``
(:mod:`hedwig_tasks.terraform`) renders the records of :func:`offline_plan` as Terraform
resources."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hedwig_tasks.exceptions import ConfigurationError

if TYPE_CHECKING:
    from hedwig_tasks.transports.base import Transport

__all__ = ["Plan", "Planned", "offline_plan"]


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


@dataclass(frozen=True)
class Plan:
    """What ``provision`` would create on an empty account or project: the Terraform
    ``provider`` it is written for (``aws`` or ``google``), the records in order, and what the
    transport knows of the module's variables (``account_id``, ``region``; ``project``)."""

    provider: str
    records: tuple[Planned, ...]
    variables: tuple[tuple[str, str | None], ...] = ()


def offline_plan(transport: Transport, queue: str | None, subscribe: Sequence[str], publish: Sequence[str]) -> Plan:
    """The transport's provisioner run offline (nothing asked of the cloud, everything missing).

    Raises ``ConfigurationError`` naming the transport when it is neither AWS nor Google Cloud.
    A transport's own module is imported already when it is in use, so no SDK is imported here.
    """
    aws = sys.modules.get("hedwig_tasks.transports.aws")
    if aws is not None and isinstance(transport, aws.AWSTransport):
        from hedwig_tasks.transports._aws_admin import Provisioner as AWSProvisioner

        on_aws = AWSProvisioner(
            transport.client,
            lease_s=transport.lease_s,
            max_receive_count=transport.max_receive_count,
            dry_run=True,
            offline=True,
        )
        on_aws.run(queue, subscribe, publish)
        known = (("account_id", transport.client.account_id), ("region", transport.client.region))
        return Plan("aws", tuple(on_aws.plan), known)
    gcp = sys.modules.get("hedwig_tasks.transports.gcp")
    if gcp is not None and isinstance(transport, gcp.GooglePubSubTransport):
        from hedwig_tasks.transports._gcp_admin import Provisioner as GCPProvisioner

        on_gcp = GCPProvisioner(
            transport.client,
            lease_s=transport.lease_s,
            max_delivery_attempts=transport.max_delivery_attempts,
            retry_backoff_s=transport.retry_backoff_s,
            dry_run=True,
            offline=True,
        )
        on_gcp.run(queue, subscribe, publish)
        return Plan("google", tuple(on_gcp.plan), (("project", transport.client.project),))
    raise ConfigurationError(
        f"provision --terraform: the {transport.scheme!r} transport has no Terraform; "
        "it is written for AWS (aws://) and Google Cloud (gcp://)"
    )
