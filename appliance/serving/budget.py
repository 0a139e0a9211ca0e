"""The memory the models may take together, and which idle models make room for one
that must load: least recently used first, never a pinned or a busy one (Ollama's
scheduler does the same)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from appliance.resources import MIB, available


@dataclass
class Candidate:
    """A loaded model as the budget sees it."""

    name: str
    need: int  # bytes it holds in the budget
    last_used: float
    pinned: bool
    in_use: int


class Budget:
    """``capacity``: memory_limit_mb where set, else what the machine had available at
    start less the reserve. ``used``: what the loaded (and loading) models hold."""

    def __init__(self, limit_mb: int, reserve_mb: int) -> None:
        self.reserve = reserve_mb * MIB
        self.limited = limit_mb > 0
        self.capacity = limit_mb * MIB if limit_mb else max(0, available() - self.reserve)
        self.used = 0

    def describe(self) -> str:
        if self.limited:
            return f"memory_limit_mb {self.capacity // MIB}"
        return f"the {self.capacity // MIB} MiB available at start less memory_reserve_mb"

    def never_fits(self, name: str, need: int) -> str | None:
        if need > self.capacity:
            return (
                f"model {name!r} refused: it needs about {need // MIB} MiB and the models' "
                f"budget is {self.capacity // MIB} MiB ({self.describe()})"
            )
        return None

    def victims(self, need: int, loaded: Iterable[Candidate]) -> list[Candidate] | None:
        """The idle models to unload, least recently used first, so that ``need`` fits;
        None when even all of them would not make room."""
        free = self.capacity - self.used
        chosen: list[Candidate] = []
        idle = sorted((c for c in loaded if not c.pinned and c.in_use == 0), key=_age)
        for candidate in idle:
            if free >= need:
                break
            chosen.append(candidate)
            free += candidate.need
        return chosen if free >= need else None

    def machine_short(self, name: str, need: int) -> str | None:
        """Whether the machine itself lacks the memory now (other processes use it)."""
        free = available() - self.reserve
        if need > free:
            return (
                f"model {name!r} cannot load now: it needs about {need // MIB} MiB and the "
                f"machine has {max(free, 0) // MIB} MiB available beyond memory_reserve_mb "
                f"{self.reserve // MIB}"
            )
        return None


def _age(candidate: Candidate) -> float:
    return candidate.last_used
