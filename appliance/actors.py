"""Who made a request: shared by the gate that finds out and the audit log that keeps it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Actor:
    """A token or user (id, name, role), or anonymous."""

    id: str | None
    name: str
    role: str | None


ANONYMOUS = Actor(None, "anonymous", None)
