"""The last hour of the key figures, for IT's /status page: sampled from the metrics
registry every ``interval`` seconds (a thread), drawn there as small SVG charts (no
script, nothing fetched).

Each sample: requests per minute, tokens generated per second, mean time to first
token and mean audit wait over the interval, requests waiting (all models), and the
process's resident memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)
POINTS = 120  # an hour at 30 s
FIGURES = {
    "requests_per_minute": "Requests / min",
    "tokens_per_second": "Tokens / s",
    "first_token_ms": "Time to first token (ms, mean)",
    "audit_wait_ms": "Audit log wait (ms, mean)",
    "queued": "Requests waiting",
    "memory_mib": "Memory (MiB, resident)",
}


def totals(registry: CollectorRegistry) -> dict[str, float]:
    """The sums the figures come from, summed over labels."""
    wanted = {
        "appliance_requests_total": "requests",
        "appliance_tokens_generated_total": "tokens",
        "appliance_time_to_first_token_seconds_sum": "ttft_sum",
        "appliance_time_to_first_token_seconds_count": "ttft_count",
        "appliance_audit_wait_seconds_sum": "audit_sum",
        "appliance_audit_wait_seconds_count": "audit_count",
        "appliance_queue_depth": "queued",
        "process_resident_memory_bytes": "rss",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in registry.collect():
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None:
                out[key] += sample.value
    return out


def _mean_ms(now: dict[str, float], before: dict[str, float], what: str) -> float:
    count = now[f"{what}_count"] - before[f"{what}_count"]
    return 1000 * (now[f"{what}_sum"] - before[f"{what}_sum"]) / count if count else 0.0


@dataclass
class Sample:
    at: float  # Unix time
    figures: dict[str, float]


class History:
    def __init__(self, registry: CollectorRegistry, interval: float = 30.0) -> None:
        self.registry = registry
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=POINTS)
        self._last: tuple[float, dict[str, float]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        now, sums = time.monotonic(), totals(self.registry)
        with self._lock:
            if self._last is not None:
                then, before = self._last
                seconds = max(now - then, 1e-9)
                figures = {
                    "requests_per_minute": 60 * (sums["requests"] - before["requests"]) / seconds,
                    "tokens_per_second": (sums["tokens"] - before["tokens"]) / seconds,
                    "first_token_ms": _mean_ms(sums, before, "ttft"),
                    "audit_wait_ms": _mean_ms(sums, before, "audit"),
                    "queued": sums["queued"],
                    "memory_mib": sums["rss"] / (1 << 20),
                }
                self.samples.append(Sample(time.time(), figures))
            self._last = (now, sums)

    def start(self) -> None:
        def run() -> None:
            while True:
                try:
                    self.sample()
                except Exception:  # a sample lost; the next one comes
                    log.exception("status history: a sample failed")
                if self._stop.wait(self.interval):
                    return

        self._thread = threading.Thread(target=run, name="history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def charts(self) -> list[dict[str, Any]]:
        """Per figure: its title, last value, the most, and an SVG polyline's points."""
        with self._lock:
            samples = list(self.samples)
        out = []
        for key, title in FIGURES.items():
            values = [s.figures[key] for s in samples]
            out.append(
                {
                    "key": key,
                    "title": title,
                    "last": values[-1] if values else None,
                    "most": max(values) if values else None,
                    "points": polyline(values),
                    "samples": len(values),
                }
            )
        return out


WIDTH, HEIGHT = 240.0, 48.0


def polyline(values: Iterable[float]) -> str:
    """An SVG polyline's ``points`` for the values, the newest at the right edge of an
    hour's width, scaled to the largest (0 at the bottom)."""
    values = list(values)
    if not values:
        return ""
    top = max(values) or 1.0
    step = WIDTH / (POINTS - 1)
    start = WIDTH - step * (len(values) - 1)
    return " ".join(
        f"{start + i * step:.1f},{HEIGHT - (v / top) * (HEIGHT - 2) - 1:.1f}"
        for i, v in enumerate(values)
    )
