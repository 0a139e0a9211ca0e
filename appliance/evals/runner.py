"""An eval run: a suite's cases sent to each model through the running appliance,
graded, summed up (score with its 95 % interval, per tag, latency, tokens/s, the
server's peak memory), kept as a report beside the run's audit record.

Models run one after another, so that each one's latency and memory are its own; the
cases of one model go ``concurrency`` at a time (1: one by one; more: through the
batcher, as a busy line would send them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from appliance.evals import stats
from appliance.evals.client import ApiFailure, Client
from appliance.evals.graders import grade
from appliance.evals.report import render_html, summarize_text
from appliance.evals.suite import Case, Suite

Progress = Callable[[int], None]
MEMORY_SAMPLE_SECONDS = 0.25


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class PeakMemory:
    """The server's resident memory, sampled while a model runs: the peak seen."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            mb = self.client.resident_mb()
        except Exception:  # a sample lost is a sample lost; the run goes on
            return
        if mb is not None:
            self.peak = mb if self.peak is None else max(self.peak, mb)

    def _run(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_SECONDS):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()


def _text_case(client: Client, suite: Suite, model: str, case: Case) -> dict[str, Any]:
    result: dict[str, Any] = {
        "id": case.id,
        "expected": case.expected,
        "tags": case.tags,
    }
    try:
        answer = client.chat(
            model, case.messages, suite.settings.max_tokens, suite.settings.temperature
        )
    except ApiFailure as exc:
        return {
            **result,
            "passed": False,
            "error": str(exc),
            "answer": "",
            "detail": str(exc),
            "latency_ms": None,
        }
    verdict = grade(case.grader, answer.text, case.expected)
    route = answer.route or {}
    return {
        **result,
        "passed": verdict.passed,
        "answer": answer.text,
        "detail": verdict.detail,
        "latency_ms": answer.latency_ms,
        "completion_tokens": answer.completion_tokens,
        # End to end (prompt, queue and answer): what a client waits per token.
        "decode_seconds": answer.latency_ms / 1000,
        **({"answered_by": route["answered_by"], "outcome": route["outcome"]} if route else {}),
    }


def _run_text(
    client: Client, suite: Suite, model: str, concurrency: int, tick: Progress
) -> dict[str, Any]:
    def one(case: Case) -> dict[str, Any]:
        result = _text_case(client, suite, model, case)
        tick(1)
        return result

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, suite.cases))
    summary = summarize_text(results)
    routed = [r["answered_by"] for r in results if "answered_by" in r]
    if routed:  # a route: which model answered how many
        summary["answered_by"] = {m: routed.count(m) for m in sorted(set(routed))}
    return {**summary, "results": results}


def _run_tensor(client: Client, suite: Suite, model: str, tick: Progress) -> dict[str, Any]:
    s = suite.settings
    assert s.input is not None and s.output is not None
    scores: list[float] = []
    latencies: list[float] = []
    results: list[dict[str, Any]] = []
    errors = 0
    for case in suite.tensor_cases:
        try:
            out, ms = client.infer(model, s.input, np.array([case.features]), s.output)
        except ApiFailure as exc:
            errors += 1
            scores.append(float("nan"))
            results.append(
                {
                    "id": case.id,
                    "passed": False,
                    "answer": "",
                    "expected": case.label,
                    "detail": str(exc),
                    "latency_ms": None,
                    "tags": case.tags,
                }
            )
            tick(1)
            continue
        row = out.reshape(-1)
        score = float(row[0]) if row.size == 1 else float(row[s.positive])
        predicted = int(score > 0.5) if row.size == 1 else int(np.argmax(row))
        predicted = predicted if row.size > 1 else (s.positive if predicted else 1 - s.positive)
        scores.append(score)
        latencies.append(ms)
        results.append(
            {
                "id": case.id,
                "passed": predicted == case.label,
                "answer": str(predicted),
                "expected": case.label,
                "score": score,
                "detail": f"score {score:.4f}, predicted {predicted}",
                "latency_ms": ms,
                "tags": case.tags,
                "predicted": predicted,
            }
        )
        tick(1)
    labels = [c.label for c in suite.tensor_cases]
    metric = _tensor_metric(s.metric, s.positive)
    values: list[float] = (
        scores if s.metric == "auc" else [float(r.get("predicted", -1)) for r in results]
    )
    score = metric(labels, values)
    low, high = stats.bootstrap_ci(metric, labels, values)
    tags: dict[str, dict[str, Any]] = {}
    for tag in sorted({t for c in suite.tensor_cases for t in c.tags}):
        for value in sorted({c.tags[tag] for c in suite.tensor_cases if tag in c.tags}):
            idx = [i for i, c in enumerate(suite.tensor_cases) if c.tags.get(tag) == value]
            sub_l, sub_v = [labels[i] for i in idx], [values[i] for i in idx]
            g_low, g_high = stats.bootstrap_ci(metric, sub_l, sub_v)
            tags.setdefault(tag, {})[value] = {
                "score": metric(sub_l, sub_v),
                "ci95": [g_low, g_high],
                "cases": len(idx),
                "passed": sum(1 for i in idx if results[i]["passed"]),
            }
    return {
        "metric": s.metric,
        "score": score,
        "ci95": [low, high],
        "passed": sum(1 for r in results if r["passed"]),
        "cases": len(results),
        "tags": tags,
        "latency_ms": {
            "p50": stats.percentile(latencies, 50) if latencies else None,
            "p95": stats.percentile(latencies, 95) if latencies else None,
            "mean": sum(latencies) / len(latencies) if latencies else None,
        },
        "tokens_per_second": None,
        "errors": errors,
        "results": results,
    }


def _tensor_metric(name: str, positive: int) -> Callable[[Any, Any], float]:
    if name == "f1":
        return lambda y, p: stats.f1(y, [int(v) for v in p], positive)
    if name == "auc":
        return lambda y, s: stats.auc(y, s, positive)
    return lambda y, p: stats.accuracy(y, [int(v) for v in p])


def identity(client: Client, model: str) -> tuple[str, dict[str, Any] | None]:
    """A model's hash as served (a specialist's: over its base and adapters; a
    route's: its config's) and what serves it."""
    card = client.model(model)
    if card.get("kind") == "route":
        return card["route"]["config_sha256"], {"route": card["route"]}
    served = (
        {"adapters": card["adapters"], "base": card.get("base")} if card.get("adapters") else None
    )
    return str(card.get("sha256", "")), served


def _check_route_temperature(suite: Suite, model: str, served_by: dict[str, Any] | None) -> None:
    """A route answers only at the temperature it was calibrated at: a suite asking
    another would have every case refused (400), so the run is refused up front."""
    calibration = ((served_by or {}).get("route") or {}).get("calibration")
    if suite.kind == "tensor" or not calibration:
        return
    calibrated = float(calibration.get("temperature", 0.0))
    if suite.settings.temperature != calibrated:
        raise ApiFailure(
            f"route {model!r} answers at the temperature it was calibrated at, "
            f"{calibrated:g}; suite {suite.name} asks {suite.settings.temperature:g}: "
            f"evaluate the route with a suite at temperature {calibrated:g}"
        )


def run(
    client: Client,
    suite: Suite,
    models: list[str],
    concurrency: int = 1,
    tick: Progress = lambda n: None,
) -> dict[str, Any]:
    started = now()
    entries = []
    for model in models:
        sha, served_by = identity(client, model)
        _check_route_temperature(suite, model, served_by)
        with PeakMemory(client) as memory:
            if suite.kind == "tensor":
                figures = _run_tensor(client, suite, model, tick)
            else:
                figures = _run_text(client, suite, model, concurrency, tick)
        entries.append(
            {
                "model": model,
                "sha256": sha,
                "served_by": served_by,
                "peak_memory_mb": memory.peak,
                **figures,
            }
        )
    report: dict[str, Any] = finite(
        {
            "run_id": uuid.uuid4().hex[:16],
            "suite": {
                "name": suite.name,
                "sha256": suite.sha256,
                "path": str(suite.path),
                "cases": len(suite.cases) or len(suite.tensor_cases),
                "threshold": suite.settings.threshold,
                "margin": suite.settings.margin,
            },
            "started": started,
            "finished": now(),
            "models": entries,
        }
    )
    return report


def finite(value: Any) -> Any:
    """The report with NaN (a metric undefined on one class) as None: valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def save(report: dict[str, Any], directory: Path) -> tuple[Path, str]:
    """Write the report (JSON and HTML) under ``directory``/RUN_ID; its path and the
    JSON's hash (which the audit record carries)."""
    out = directory / report["run_id"]
    out.mkdir(parents=True, exist_ok=True)
    data = json.dumps(report, indent=2, sort_keys=True, default=str).encode() + b"\n"
    (out / "report.json").write_bytes(data)
    (out / "report.html").write_text(render_html(report))
    return out, hashlib.sha256(data).hexdigest()


def audit_summary(report: dict[str, Any], sha256: str, where: Path) -> dict[str, Any]:
    """What the run's audit record carries: the suite's hash, each model's hash and
    scores (overall and per tag), and the report's hash and place."""
    return {
        "run_id": report["run_id"],
        "suite": report["suite"],
        "report": {"path": str(where), "sha256": sha256},
        "models": [
            {
                "model": m["model"],
                "sha256": m["sha256"],
                "served_by": m["served_by"],
                "metric": m["metric"],
                "score": m["score"],
                "ci95": m["ci95"],
                "cases": m["cases"],
                "errors": m["errors"],
                "tags": {
                    tag: {v: g["score"] for v, g in groups.items()}
                    for tag, groups in m["tags"].items()
                },
            }
            for m in report["models"]
        ],
    }


def latest(
    directory: Path, suite_sha256: str, model: str, model_sha256: str
) -> dict[str, Any] | None:
    """The newest saved run of this suite on this model as it is now (same hashes)."""
    found: list[tuple[str, dict[str, Any]]] = []
    for path in directory.glob("*/report.json"):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if report.get("suite", {}).get("sha256") != suite_sha256:
            continue
        for entry in report.get("models", []):
            if entry.get("model") == model and entry.get("sha256") == model_sha256:
                found.append((report.get("finished", ""), entry))
    return max(found, key=lambda f: f[0])[1] if found else None
