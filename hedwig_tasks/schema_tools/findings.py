"""What a schema comparison finds: one :class:`Finding` per change, and the report of them all."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BACKWARD", "BOTH", "FORWARD", "MODES", "VERSION", "Finding", "Report"]

#: New consumers read old messages: everything valid under OLD is valid under NEW.
BACKWARD = "backward"
#: Old consumers read new messages: everything valid under NEW is valid under OLD.
FORWARD = "forward"
#: Both of those: Hedwig's default, as consumers and publishers deploy in any order.
BOTH = "both"
#: A rule about ``x-version`` (or ``minor_version``), whatever the mode.
VERSION = "version"
#: The directions ``--mode`` takes.
MODES = (BOTH, BACKWARD, FORWARD)


@dataclass(frozen=True)
class Finding:
    """One change between OLD and NEW.

    ``breaks`` names the directions it breaks (``backward``, ``forward``, ``version``; empty for
    a change that breaks nothing, such as an added optional field or a new major). ``where`` is
    a JSON pointer into the schema file, or ``Message.field (number)`` for protobuf.
    """

    type: str
    version: str
    where: str
    message: str
    breaks: tuple[str, ...] = ()

    def violates(self, mode: str) -> bool:
        """Whether this change is a violation when checking ``mode`` (one of :data:`MODES`)."""
        if VERSION in self.breaks:
            return True
        return any(mode in (BOTH, direction) for direction in self.breaks)

    def line(self) -> str:
        return f"{self.type} {self.version} {self.where}: {self.message}"


@dataclass(frozen=True)
class Report:
    """Every finding of one comparison, and the mode they are judged in."""

    mode: str
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def violations(self) -> list[Finding]:
        return [f for f in self.findings if f.violates(self.mode)]

    @property
    def compatible(self) -> bool:
        return not self.violations

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "compatible": self.compatible,
            "violations": [asdict(f) for f in self.violations],
            "changes": [asdict(f) for f in self.findings if not f.violates(self.mode)],
        }

    def text(self) -> str:
        """What a person reads: the violations, then the changes that break nothing."""
        lines = [f"violation: {f.line()} (breaks {', '.join(f.breaks)})" for f in self.violations]
        lines += [f"ok: {f.line()}" for f in self.findings if not f.violates(self.mode)]
        verdict = "compatible" if self.compatible else f"{len(self.violations)} violation(s)"
        lines.append(f"{verdict} (mode: {self.mode})")
        return "\n".join(lines)
