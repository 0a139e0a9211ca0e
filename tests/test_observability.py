"""deploy/: the Grafana dashboard and the Prometheus alerting rules IT loads. The rules
pass promtool (and fire on the series they should); every metric that a dashboard query
or an alert names is one the real server exports, scraped after a chat completion."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from helpers import REPO, Server

pytestmark = pytest.mark.server

DASHBOARD = REPO / "deploy" / "grafana" / "appliance-dashboard.json"
ALERTS = REPO / "deploy" / "prometheus" / "appliance-alerts.yml"

# PromQL's functions, aggregations and keywords: never metric names.
_WORDS = """abs absent absent_over_time acos acosh asin asinh atan atanh avg avg_over_time bool
    bottomk by ceil changes clamp clamp_max clamp_min count count_over_time count_values
    cos cosh day_of_month day_of_week day_of_year days_in_month deg delta deriv exp floor
    group group_left group_right hour histogram_quantile holt_winters idelta ignoring
    increase irate label_join label_replace last_over_time ln log10 log2 max max_over_time
    min min_over_time minute month offset on or and unless pi predict_linear
    present_over_time quantile quantile_over_time rad rate resets round scalar sgn sin sinh
    sort sort_desc sqrt stddev stddev_over_time stdvar stdvar_over_time sum sum_over_time
    tan tanh time timestamp topk vector without year"""
PROMQL_WORDS = frozenset(_WORDS.split())
STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
# An identifier, whole, not a function call: followed by a selector, a range, a space,
# a parenthesis, an operator or the end.
IDENT = re.compile(r"(?<![a-zA-Z0-9_:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![a-zA-Z0-9_:(])")


def metric_names(expr: str) -> set[str]:
    """The appliance_* and process_* metric names a PromQL expression names (loosely:
    string literals and Grafana's $variables left out)."""
    bare = STRINGS.sub('""', expr)
    return {
        name
        for name in IDENT.findall(bare)
        if name.startswith(("appliance_", "process_")) and name not in PROMQL_WORDS
    }


def exported_series(scrape: str) -> set[str]:
    """The series names the `# TYPE` lines of a scrape promise: a counter's `_total`, a
    histogram's `_bucket`, `_sum` and `_count`, a summary's `_sum` and `_count`."""
    names: set[str] = set()
    for line in scrape.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split()
        if kind == "counter":
            base = name.removesuffix("_total")
            names |= {f"{base}_total", f"{base}_created"}
        elif kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
        elif kind == "summary":
            names |= {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
        else:
            names.add(name)
    return names


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows too; rows themselves left out."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            found += panels(panel)
        else:
            found.append(panel)
    return found


def dashboard_exprs(dashboard: dict[str, Any]) -> dict[str, str]:
    """Where each PromQL expression is (panel title / refId, or variable) -> the expression."""
    exprs = {
        f"{p['title']} / {t['refId']}": t["expr"] for p in panels(dashboard) for t in p["targets"]
    }
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            exprs[f"variable {var['name']}"] = query["query"] if isinstance(query, dict) else query
    return exprs


def alert_exprs(rules: dict[str, Any]) -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def unknown_metrics(exprs: dict[str, str], exported: set[str]) -> dict[str, set[str]]:
    """Per expression, the metric names it uses that the server does not export."""
    unknown = {where: metric_names(expr) - exported for where, expr in exprs.items()}
    return {where: names for where, names in unknown.items() if names}


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def load_rules() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return data


@pytest.fixture(scope="module")
def scrape(shared_server: Server, model_name: str) -> str:
    """/metrics of the real server after one chat completion (so per-model series exist)."""
    answer = shared_server.http.post(
        "/v1/chat/completions",
        json={
            "model": model_name,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert answer.status_code == 200, answer.text
    response = httpx.get(f"{shared_server.url}/metrics", timeout=30)  # no token, as Prometheus
    assert response.status_code == 200
    return response.text


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: scripts/test installs it (ensure_promtool)"
    return path


def test_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_exprs(load_rules()))} rules found" in result.stdout


INSTANCE = {"instance": "box:8000", "job": "appliance"}
MODEL = INSTANCE | {"model": "smollm2-135m-instruct"}


def _series(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def test_alerts_fire_on_their_series(tmp_path: Path) -> None:
    """promtool test rules on made series: each alert fires once its `for` has passed,
    not a minute before, and none fires on a healthy appliance."""
    refused = MODEL | {"kind": "chat", "state": "refused"}
    # alert -> (its series when healthy, when broken; the labels it fires with)
    cases: dict[str, tuple[dict[str, str], dict[str, str], dict[str, str]]] = {
        "ApplianceDown": (
            {_series("up", INSTANCE): "1x90"},
            {_series("up", INSTANCE): "0x90"},
            INSTANCE,
        ),
        "ApplianceAuditLogNotWritable": (
            {_series("appliance_audit_writable", INSTANCE): "1x90"},
            {_series("appliance_audit_writable", INSTANCE): "0x90"},
            INSTANCE,
        ),
        "ApplianceModelRefused": (
            {_series("appliance_model_state", MODEL | {"kind": "chat", "state": "ready"}): "1x90"},
            {_series("appliance_model_state", refused): "1x90"},
            refused,
        ),
        "ApplianceQueueSaturated": (
            {
                _series("appliance_queue_depth", MODEL): "2x90",
                _series("appliance_queue_capacity", MODEL): "8x90",
            },
            {
                _series("appliance_queue_depth", MODEL): "7x90",
                _series("appliance_queue_capacity", MODEL): "8x90",
            },
            MODEL,
        ),
        "ApplianceCertificateExpiresSoon": (
            {_series("appliance_tls_certificate_expiry_timestamp_seconds", INSTANCE): "1e9x90"},
            {_series("appliance_tls_certificate_expiry_timestamp_seconds", INSTANCE): "86400x90"},
            INSTANCE,
        ),
        "ApplianceMachineMemoryLow": (
            {
                _series("appliance_system_memory_available_bytes", INSTANCE): "8e9x90",
                _series("appliance_system_memory_total_bytes", INSTANCE): "16e9x90",
            },
            {
                _series("appliance_system_memory_available_bytes", INSTANCE): "1e9x90",
                _series("appliance_system_memory_total_bytes", INSTANCE): "16e9x90",
            },
            INSTANCE,
        ),
        "ApplianceModelsBudgetFull": (
            {
                _series("appliance_models_budget_used_bytes", INSTANCE): "4e9x90",
                _series("appliance_models_budget_bytes", INSTANCE): "8e9x90",
            },
            {
                _series("appliance_models_budget_used_bytes", INSTANCE): "7.9e9x90",
                _series("appliance_models_budget_bytes", INSTANCE): "8e9x90",
            },
            INSTANCE,
        ),
    }
    rules = {r["alert"]: r for g in load_rules()["groups"] for r in g["rules"]}
    assert set(cases) == set(rules)

    def case(broken: bool, at: int) -> dict[str, Any]:
        series = {
            s: v
            for healthy, bad, _ in cases.values()
            for s, v in (bad if broken else healthy).items()
        }
        checks = []
        for name, (_, _, labels) in cases.items():
            check: dict[str, Any] = {"eval_time": f"{at}m", "alertname": name}
            wait = int(str(rules[name]["for"]).removesuffix("m"))
            if broken and at >= wait:
                own = labels | {"alertname": name} | rules[name]["labels"]
                check["exp_alerts"] = [{"exp_labels": own}]
            checks.append(check)
        return {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series.items()],
            "alert_rule_test": checks,
        }

    waits = sorted({int(str(r["for"]).removesuffix("m")) for r in rules.values()})
    tests = [case(False, 20)] + [case(True, at) for w in waits for at in (w - 1, w)]
    # The rules as written, less their annotations (promtool would hold them to the
    # rendered text; check rules has checked their templates).
    stripped = load_rules()
    for group in stripped["groups"]:
        for rule in group["rules"]:
            del rule["annotations"]
    rules_file = tmp_path / "appliance-alerts.yml"
    rules_file.write_text(yaml.safe_dump(stripped, sort_keys=False))
    spec = {"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": tests}
    unit = tmp_path / "appliance-alerts.test.yml"
    unit.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        [promtool(), "test", "rules", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_and_alerts_name_only_exported_metrics(scrape: str) -> None:
    exported = exported_series(scrape)
    # The scrape is the real one, after the request: per-model series are there.
    assert 'appliance_tokens_per_second{model="' in scrape
    assert 'appliance_requests_total{model="' in scrape

    dashboard, rules = load_dashboard(), load_rules()
    used = dashboard_exprs(dashboard) | alert_exprs(rules)
    # Exported only when the appliance speaks TLS (tests/test_tls.py scrapes it there).
    tls_only = {"appliance_tls_certificate_expiry_timestamp_seconds"}
    assert unknown_metrics(used, exported | tls_only) == {}
    # Each expression names at least one of the appliance's metrics (the parse found it),
    # but the bare `up` that Prometheus makes itself.
    assert all(metric_names(e) for w, e in used.items() if w != "ApplianceDown")

    # The checker catches a name the server does not export (a made-up one, and a
    # histogram named without its _bucket), and a metric a counter lost its _total from.
    bad = copy.deepcopy(dashboard)
    target = bad["panels"][-1]["targets"][0]
    target["expr"] = (
        "histogram_quantile(0.5, sum by (le) (rate("
        'appliance_made_up_seconds_bucket{instance=~"$instance"}[5m])))'
        " + appliance_request_seconds + rate(appliance_tokens_generated[5m])"
    )
    found = unknown_metrics(dashboard_exprs(bad), exported)
    assert found == {
        f"{bad['panels'][-1]['title']} / {target['refId']}": {
            "appliance_made_up_seconds_bucket",
            "appliance_request_seconds",
            "appliance_tokens_generated",
        }
    }
    bad_rules = copy.deepcopy(rules)
    bad_rules["groups"][0]["rules"][0]["expr"] = "appliance_certificate_expiry_seconds < 86400"
    assert unknown_metrics(alert_exprs(bad_rules), exported | tls_only) == {
        bad_rules["groups"][0]["rules"][0]["alert"]: {"appliance_certificate_expiry_seconds"}
    }


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every dashboard query is PromQL Prometheus parses: promtool checks them as
    recording rules, Grafana's variables given values."""
    grafana = {"$__rate_interval": "5m", "$instance": ".*"}
    records = []
    for i, expr in enumerate(dashboard_exprs(load_dashboard()).values()):
        for var, value in grafana.items():
            expr = expr.replace(var, value)
        # a variable's label_values(SELECTOR, LABEL) is Grafana's: check its selector
        expr = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr)
        records.append({"record": f"dashboard:query_{i}", "expr": expr})
    rules = tmp_path / "dashboard.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_name_parse() -> None:
    expr = (
        'label_replace(sum by (model) (rate(appliance_requests_total{status=~"[45].."}'
        '[$__rate_interval])), "model", "appliance_not_a_metric", "model", "")'
        " / on (model) appliance_slots > bool 0 or process_resident_memory_bytes"
    )
    assert metric_names(expr) == {
        "appliance_requests_total",
        "appliance_slots",
        "process_resident_memory_bytes",
    }


def test_dashboard_shape() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "appliance"
    assert dashboard["schemaVersion"] == 39
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    found = panels(dashboard)
    assert found
    assert len({p["id"] for p in found}) == len(found)
    for panel in found:
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"]
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0
    titles = {p["title"] for p in found}
    assert {
        "Requests and errors per model",
        "Request latency p50 / p95 by route",
        "Tokens/s per model",
        "Slots busy and queue depth per model",
        "Model memory and the models' budget",
        "Process RSS and machine memory",
        "Audit log writable",
        "Route answers by outcome",
        "Grounded answers and citations",
        "Model state",
    } <= titles


def test_first_token_audit_wait_and_queue_capacity_are_measured(
    scrape: str, model_name: str
) -> None:
    """What IT watches beside the request counts: time to first token per model, the
    time requests wait on the audit log, and each model's configured queue."""

    def value(series: str) -> float:
        for line in scrape.splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{series} not in the scrape")

    assert value(f'appliance_time_to_first_token_seconds_count{{model="{model_name}"}}') >= 1
    assert value(f'appliance_time_to_first_token_seconds_sum{{model="{model_name}"}}') > 0
    assert value("appliance_audit_wait_seconds_count") >= 1
    assert value(f'appliance_queue_capacity{{model="{model_name}"}}') == 4  # --queue-depth 4


def test_status_draws_the_last_hour(app: Any, app_token: str) -> None:
    """The history samples the registry's sums; two samples around a request make a
    point per chart, and /status draws them (inline SVG, no script)."""
    from appliance.api.metrics import EXTENSION

    history = app.extensions[EXTENSION].history
    client = app.test_client()
    headers = {"Authorization": f"Bearer {app_token}"}
    history.sample()
    history.sample()  # a fresh history's first sample only sets the baseline
    before = history.samples[-1]  # not a count: the deque holds the last hour, and the
    for _ in range(3):  # session's own sampler (every 30 s) may add one meanwhile
        client.get("/v1/models", headers=headers)
    history.sample()
    since = list(history.samples)
    since = since[since.index(before) + 1 :]  # ours, and one of the sampler's, if it ran
    assert any(s.figures["requests_per_minute"] > 0 for s in since), since
    assert since[-1].figures["memory_mib"] > 10
    page = client.get("/status", headers=headers).get_data(as_text=True)
    charts = re.findall(r'<figure class="chart" id="chart-([a-z_]+)">', page)
    assert charts == [
        "requests_per_minute",
        "tokens_per_second",
        "first_token_ms",
        "audit_wait_ms",
        "queued",
        "memory_mib",
    ]
    assert page.count("<polyline points=") == 6 and "<script" not in page.split("<main>")[1]
