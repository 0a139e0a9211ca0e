"""A run's figures and its HTML report.

The runner sends a suite's cases to each model, grades the answers, and writes a run
report, a dict (kept as JSON) of this shape::

    {"run_id": str,
     "suite": {"name": str, "sha256": str, "path": str, "cases": int,
               "threshold": float | None, "margin": float},
     "started": ISO-8601 str, "finished": ISO-8601 str,
     "models": [{
         "model": str, "sha256": str, "served_by": dict | None,
         "metric": "pass rate" | "accuracy" | "f1" | "auc",
         "score": float, "ci95": [low, high], "passed": int, "cases": int,
         "tags": {tag: {value: {"score": float, "ci95": [low, high],
                                "cases": int, "passed": int}}},
         "latency_ms": {"p50": float | None, "p95": float | None, "mean": float | None},
         "tokens_per_second": float | None, "peak_memory_mb": float | None,
         "errors": int,
         "results": [{"id": str, "passed": bool, "answer": str, "expected": Any,
                      "detail": str, "latency_ms": float | None,
                      "tags": {tag: value}}]}]}

:func:`summarize_text` computes a text model's figures (``metric`` to ``errors``)
from its per-case results; :func:`render_html` draws the report as one
self-contained page (inline CSS and SVG, no script, nothing fetched), which can be
opened on a machine with no network. Every string from the report is escaped:
answers are model output and must not become markup.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .stats import percentile, wilson

MAX_FAILURES_SHOWN = 200  # per model; the rest are counted, not listed


def summarize_text(case_results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A text model's figures from its graded cases. Each result has ``passed``
    (bool), ``latency_ms`` (float, or None when the request failed), ``tags``,
    ``completion_tokens`` and ``decode_seconds`` (None or absent when unknown), and
    optionally ``error`` (a truthy value counts the case as an error and a failure).

    Returns ``metric``, ``score``, ``ci95``, ``passed``, ``cases``, ``tags``,
    ``latency_ms`` (None figures when no case has a latency), ``tokens_per_second``
    (all completion tokens over all decode seconds; None without decode time) and
    ``errors``. An empty list scores 0.0 with the interval (0.0, 1.0)."""
    n = len(case_results)
    passed = sum(1 for r in case_results if r.get("passed") is True and not r.get("error"))
    groups: dict[str, dict[str, list[bool]]] = {}
    for r in case_results:
        ok = r.get("passed") is True and not r.get("error")
        for tag, value in sorted((r.get("tags") or {}).items()):
            groups.setdefault(str(tag), {}).setdefault(str(value), []).append(ok)
    tags = {
        tag: {value: _group(oks) for value, oks in sorted(values.items())}
        for tag, values in sorted(groups.items())
    }
    latencies = [float(r["latency_ms"]) for r in case_results if _real(r.get("latency_ms"))]
    tokens = sum(int(r.get("completion_tokens") or 0) for r in case_results)
    seconds = sum(
        float(r["decode_seconds"]) for r in case_results if _real(r.get("decode_seconds"))
    )
    low, high = wilson(passed, n)
    return {
        "metric": "pass rate",
        "score": passed / n if n else 0.0,
        "ci95": [low, high],
        "passed": passed,
        "cases": n,
        "tags": tags,
        "latency_ms": {
            "p50": percentile(latencies, 50) if latencies else None,
            "p95": percentile(latencies, 95) if latencies else None,
            "mean": sum(latencies) / len(latencies) if latencies else None,
        },
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "errors": sum(1 for r in case_results if r.get("error")),
    }


def _group(oks: list[bool]) -> dict[str, Any]:
    passed = sum(oks)
    low, high = wilson(passed, len(oks))
    return {"score": passed / len(oks), "ci95": [low, high], "cases": len(oks), "passed": passed}


def _real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- HTML -------------------------------------------------------------------------

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .meta{color:#555} code{font-size:.9em}
table{border-collapse:collapse;margin:1em 0} th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;word-break:break-word;margin:0;max-width:40em}
details{margin:.5em 0} summary{cursor:pointer;font-weight:600}
.pass{color:#1a7f37} .fail{color:#b3261e}
"""
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
_W, _H = 720, 400
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 190, 24, 56


def render_html(report: Mapping[str, Any]) -> str:
    """The run report as a self-contained HTML page."""
    suite = report.get("suite") or {}
    models: list[Mapping[str, Any]] = list(report.get("models") or [])
    name = str(suite.get("name", "suite"))
    threshold = _float(suite.get("threshold"))
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Eval: {_e(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Eval: {_e(name)}</h1>",
        '<p class="meta">',
        f"suite sha256 <code>{_e(suite.get('sha256', ''))}</code><br>",
        f"{_e(suite.get('cases', '?'))} cases · threshold {_fmt(threshold)}",
        f" · margin {_fmt(_float(suite.get('margin')))}<br>",
        f"run <code>{_e(report.get('run_id', ''))}</code> · ",
        f"{_e(report.get('started', ''))} to {_e(report.get('finished', ''))}</p>",
        _chart(models, threshold),
        "<h2>Models</h2>",
        _models_table(models, threshold),
        "<h2>By tag</h2>",
        _tags_table(models),
        "<h2>Failed cases</h2>",
        *(_failures(m) for m in models),
        "</body></html>",
    ]
    return "\n".join(parts)


def _chart(models: Sequence[Mapping[str, Any]], threshold: float | None) -> str:
    plotted = [(i, m) for i, m in enumerate(models) if _p50(m) is not None]
    x_max, x_step = _nice_axis(max((_p50(m) or 0.0 for _, m in plotted), default=0.0))
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(v: float) -> float:
        return _LEFT + plot_w * min(max(v / x_max, 0.0), 1.0)

    def y(v: float) -> float:
        return _TOP + plot_h * (1 - min(max(v, 0.0), 1.0))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img" aria-labelledby="chart-title" '
        'font-family="system-ui,sans-serif" font-size="12">',
        '<title id="chart-title">Score against median latency, one point per model, '
        "with 95 % confidence intervals</title>",
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" '
        'fill="none" stroke="#999"/>',
    ]
    for k in range(6):
        v = k / 5
        out.append(
            f'<line x1="{_LEFT - 5}" y1="{y(v):.1f}" x2="{_LEFT}" y2="{y(v):.1f}" stroke="#999"/>'
            f'<text x="{_LEFT - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>'
        )
    ticks = round(x_max / x_step)
    for k in range(ticks + 1):
        v = k * x_step
        out.append(
            f'<line x1="{x(v):.1f}" y1="{_TOP + plot_h}" x2="{x(v):.1f}" '
            f'y2="{_TOP + plot_h + 5}" stroke="#999"/>'
            f'<text x="{x(v):.1f}" y="{_TOP + plot_h + 18}" text-anchor="middle">{v:g}</text>'
        )
    out.append(
        f'<text x="{_LEFT + plot_w / 2}" y="{_H - 12}" text-anchor="middle">'
        "latency p50 (ms)</text>"
        f'<text transform="translate(16 {_TOP + plot_h / 2}) rotate(-90)" '
        'text-anchor="middle">score</text>'
    )
    if threshold is not None:
        out.append(
            f'<line class="threshold" x1="{_LEFT}" y1="{y(threshold):.1f}" '
            f'x2="{_LEFT + plot_w}" y2="{y(threshold):.1f}" stroke="#b3261e" '
            'stroke-dasharray="6 4"><title>threshold '
            f"{_fmt(threshold)}</title></line>"
            f'<text x="{_LEFT + plot_w + 6}" y="{y(threshold) + 4:.1f}" fill="#b3261e">'
            f"threshold {_fmt(threshold)}</text>"
        )
    for i, m in plotted:
        color = _COLORS[i % len(_COLORS)]
        px, score = x(_p50(m) or 0.0), _float(m.get("score")) or 0.0
        low, high = _ci(m)
        tip = (
            f"{m.get('model', '?')}: {m.get('metric', 'score')} {_fmt(score)} "
            f"(95 % CI {_fmt(low)} to {_fmt(high)}), p50 {_fmt(_p50(m), 0)} ms"
        )
        if low is not None and high is not None:
            out.append(
                f'<g class="ci" stroke="{color}"><line x1="{px:.1f}" y1="{y(low):.1f}" '
                f'x2="{px:.1f}" y2="{y(high):.1f}"/>'
                f'<line x1="{px - 4:.1f}" y1="{y(low):.1f}" x2="{px + 4:.1f}" y2="{y(low):.1f}"/>'
                f'<line x1="{px - 4:.1f}" y1="{y(high):.1f}" x2="{px + 4:.1f}" '
                f'y2="{y(high):.1f}"/></g>'
            )
        out.append(
            f'<circle class="point" cx="{px:.1f}" cy="{y(score):.1f}" r="5" fill="{color}">'
            f"<title>{_e(tip)}</title></circle>"
            f'<text x="{px + 8:.1f}" y="{y(score) - 6:.1f}" fill="{color}">'
            f"{_e(m.get('model', '?'))}</text>"
        )
    out.append("</svg>")
    missing = [m for m in models if _p50(m) is None]
    if missing:
        names = ", ".join(_e(m.get("model", "?")) for m in missing)
        out.append(f'<p class="meta">Not plotted (no latency): {names}</p>')
    return "\n".join(out)


def _nice_axis(top: float) -> tuple[float, float]:
    """An axis end at or above ``top`` and a tick step of 1, 2, 2.5 or 5 × 10^k,
    about five ticks."""
    if not top > 0 or not math.isfinite(top):
        return 1.0, 0.2
    raw = top / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(s * magnitude for s in (1, 2, 2.5, 5, 10) if s * magnitude >= raw)
    return math.ceil(top / step - 1e-9) * step, step


def _models_table(models: Sequence[Mapping[str, Any]], threshold: float | None) -> str:
    head = [
        "model", "sha256", "metric", "score", "95 % CI", "passed", "p50 ms", "p95 ms",
        "tokens/s", "peak MB", "errors",
    ]  # fmt: skip
    if threshold is not None:
        head.append("≥ threshold")
    rows = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for m in models:
        low, high = _ci(m)
        latency = m.get("latency_ms") or {}
        score = _float(m.get("score"))
        cells = [
            _e(m.get("model", "?")),
            f"<code>{_e(str(m.get('sha256', ''))[:12])}</code>",
            _e(m.get("metric", "")),
            _num(score),
            _num(None, f"{_fmt(low)} – {_fmt(high)}"),
            _num(None, f"{_e(m.get('passed', '?'))}/{_e(m.get('cases', '?'))}"),
            _num(_float(latency.get("p50")), digits=0),
            _num(_float(latency.get("p95")), digits=0),
            _num(_float(m.get("tokens_per_second")), digits=1),
            _num(_float(m.get("peak_memory_mb")), digits=0),
            _num(_float(m.get("errors")), digits=0),
        ]
        if threshold is not None:
            ok = score is not None and score >= threshold
            cells.append(f'<span class="{"pass" if ok else "fail"}">{"yes" if ok else "no"}</span>')
        rows.append("<tr>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells))
    rows.append("</table>")
    return "\n".join(rows)


def _tags_table(models: Sequence[Mapping[str, Any]]) -> str:
    groups = sorted(
        {
            (str(tag), str(value))
            for m in models
            for tag, values in (m.get("tags") or {}).items()
            for value in values
        }
    )
    if not groups:
        return '<p class="meta">No tags.</p>'
    head = "".join(f"<th>{_e(t)}={_e(v)}</th>" for t, v in groups)
    rows = [f"<table><tr><th>model</th>{head}</tr>"]
    for m in models:
        cells = []
        for tag, value in groups:
            g = ((m.get("tags") or {}).get(tag) or {}).get(value)
            if not g:
                cells.append(_num(None))
                continue
            low, high = _ci(g)
            tip = f"95 % CI {_fmt(low)} – {_fmt(high)}"
            text = f"{_fmt(_float(g.get('score')))} ({_e(g.get('cases', '?'))})"
            cells.append(f'<td class="n" title="{_e(tip)}">{text}</td>')
        rows.append(f"<tr><td>{_e(m.get('model', '?'))}</td>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _failures(m: Mapping[str, Any]) -> str:
    failed = [r for r in (m.get("results") or []) if not r.get("passed")]
    out = [
        f"<details><summary>{_e(m.get('model', '?'))}: {len(failed)} failed</summary>",
    ]
    if failed:
        out.append("<table><tr><th>id</th><th>answer</th><th>expected</th><th>detail</th></tr>")
        for r in failed[:MAX_FAILURES_SHOWN]:
            expected = json.dumps(r.get("expected"), ensure_ascii=False, default=str)
            out.append(
                f"<tr><td>{_e(r.get('id', ''))}</td><td><pre>{_e(r.get('answer', ''))}</pre></td>"
                f"<td><pre>{_e(expected)}</pre></td><td>{_e(r.get('detail', ''))}</td></tr>"
            )
        out.append("</table>")
        if len(failed) > MAX_FAILURES_SHOWN:
            out.append(f"<p>… and {len(failed) - MAX_FAILURES_SHOWN} more.</p>")
    out.append("</details>")
    return "\n".join(out)


def _p50(m: Mapping[str, Any]) -> float | None:
    return _float((m.get("latency_ms") or {}).get("p50"))


def _ci(m: Mapping[str, Any]) -> tuple[float | None, float | None]:
    ci = m.get("ci95")
    if isinstance(ci, Sequence) and not isinstance(ci, str) and len(ci) == 2:
        return _float(ci[0]), _float(ci[1])
    return None, None


def _float(value: Any) -> float | None:
    return float(value) if _real(value) else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _num(value: float | None, text: str | None = None, digits: int = 2) -> str:
    return f'<td class="n">{text if text is not None else _fmt(value, digits)}</td>'


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
