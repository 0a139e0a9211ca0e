"""/metrics in Prometheus text: requests by route, model and status, latency, queue
depth, tokens and tokens/s, model state, process and machine resources."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psutil
from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance import context
from appliance.api.health import get_drain
from appliance.api.history import History
from appliance.api.trail import get_store
from appliance.audit import siem
from appliance.audit.witness import EXTENSION as WITNESS
from appliance.context import RequestContext
from appliance.engines import devices
from appliance.routing import get_router
from appliance.serving import get_pool

bp = Blueprint("metrics", __name__)
EXTENSION = "appliance.metrics"


class Metrics:
    history: History

    def __init__(self, app: Flask) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "appliance_requests_total",
            "Requests answered.",
            ["route", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "appliance_request_seconds",
            "Request latency.",
            ["route"],
            registry=self.registry,
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
                120,
            ),
        )
        self.tokens = Counter(
            "appliance_tokens_generated_total",
            "Tokens generated.",
            ["model"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "appliance_prompt_tokens_total",
            "Prompt tokens of language-model requests.",
            ["model"],
            registry=self.registry,
        )
        self.cached_tokens = Counter(
            "appliance_prompt_tokens_cached_total",
            "Prompt tokens found in the KV cache (not computed again); over "
            "appliance_prompt_tokens_total: the prefix-cache hit rate.",
            ["model"],
            registry=self.registry,
        )
        self.first_token = Histogram(
            "appliance_time_to_first_token_seconds",
            "From a language-model request's arrival to its first answer token.",
            ["model"],
            registry=self.registry,
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.audit_wait = Histogram(
            "appliance_audit_wait_seconds",
            "Time a request waited on the audit log (its records made durable).",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.grounded = Counter(
            "appliance_grounded_answers_total",
            "Grounded answers: sourced (given passages) or no_source (nothing relevant).",
            ["outcome"],
            registry=self.registry,
        )
        self.citations = Counter(
            "appliance_citations_total",
            "Citations in grounded answers: by the model, attributed (the answer cited "
            "nothing; the source it repeats), or removed (a source it was not given).",
            ["kind"],
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        self.state = _StateCollector(app)
        self.registry.register(self.state)

    def observe(self, ctx: RequestContext, route: str, status: int, seconds: float) -> None:
        model = ctx.model or ""
        self.requests.labels(route, model, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if ctx.usage.completion_tokens:
            self.tokens.labels(model).inc(ctx.usage.completion_tokens)
        if ctx.usage.prompt_tokens:
            self.prompt_tokens.labels(model).inc(ctx.usage.prompt_tokens)
            self.cached_tokens.labels(model).inc(ctx.usage.cached_tokens or 0)
        if ctx.first_token_at is not None:
            self.first_token.labels(model).observe(ctx.first_token_at - ctx.started)
        if ctx.audit_ms:
            self.audit_wait.observe(ctx.audit_ms / 1000)
        g = ctx.grounding
        if g is not None:
            self.grounded.labels("no_source" if g.no_source else "sourced").inc()
            self.citations.labels("model").inc(len(g.cited) - len(g.attributed))
            self.citations.labels("attributed").inc(len(g.attributed))
            self.citations.labels("removed").inc(g.removed)


_EXPIRY: dict[str, tuple[float, float | None]] = {}  # cert path -> (mtime, expiry)


def certificate_expiry(app: Flask) -> float | None:
    """The TLS certificate's not-after time, read again only when the file changes."""
    from appliance.tls import tls_enabled

    settings = app.config["APPLIANCE_SETTINGS"]
    if not tls_enabled(settings):
        return None
    path = settings.tls_cert_path
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    cached = _EXPIRY.get(str(path))
    if cached is None or cached[0] != mtime:
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            expiry: float | None = cert.not_valid_after_utc.timestamp()
        except (OSError, ValueError):
            expiry = None
        cached = _EXPIRY[str(path)] = (mtime, expiry)
    return cached[1]


GPU_READ_SECONDS = 5.0


class _StateCollector(Collector):
    """Read at scrape time: queues, model state, tokens/s, machine resources."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.tokens_per_second: dict[str, float] = {}
        self._gpu_read: tuple[float, list[devices.Device]] = (-GPU_READ_SECONDS, [])

    def _gpus(self) -> list[devices.Device]:
        """The GPUs and their memory, read at most every GPU_READ_SECONDS however often
        /metrics is scraped (each read is a driver call)."""
        at, found = self._gpu_read
        now = time.monotonic()
        if now - at >= GPU_READ_SECONDS:
            found = devices.gpus()
            self._gpu_read = (now, found)
        return found

    def _routes(self) -> Metric:
        answers = CounterMetricFamily(
            "appliance_route_answers",
            "Routed answers by route, the model that answered (or referral) and outcome: "
            "specialist, generalist (off-domain), fallback (specialist not confident), "
            "referral (neither confident) or cancelled (the client left a stream first).",
            labels=["route", "answered_by", "outcome"],
        )
        router = get_router(self.app)
        with router.lock:
            counts = dict(router.counts)
        for (route, by, outcome), n in sorted(counts.items()):
            answers.add_metric([route, by, outcome], n)
        return answers

    def collect(self) -> Iterator[Metric]:
        pool = get_pool(self.app)
        queued = GaugeMetricFamily(
            "appliance_queue_depth", "Requests waiting per model.", labels=["model"]
        )
        busy = GaugeMetricFamily(
            "appliance_busy_slots", "Requests running per model.", labels=["model"]
        )
        state = GaugeMetricFamily(
            "appliance_model_loaded",
            "1 when the model is loaded and serves, 0 otherwise.",
            labels=["model", "format"],
        )
        states = GaugeMetricFamily(
            "appliance_model_state",
            "1 for the state a model is in: unloaded, loading, ready, unloading, refused.",
            labels=["model", "kind", "state"],
        )
        memory = GaugeMetricFamily(
            "appliance_model_memory_bytes",
            "Memory a loaded model holds in the models' budget (its estimated footprint).",
            labels=["model"],
        )
        loads = CounterMetricFamily(
            "appliance_model_loads", "Times a model was loaded.", labels=["model"]
        )
        unloads = CounterMetricFamily(
            "appliance_model_unloads",
            "Times a model was unloaded (keep-alive, to make room, or stopping).",
            labels=["model"],
        )
        kv_cache = GaugeMetricFamily(
            "appliance_kv_cache_usage_ratio",
            "Share of a language model's KV-cache cells held by running requests, 0 to 1 "
            "(the Gateway API Inference Extension's KV-cache utilization).",
            labels=["model"],
        )
        slots = GaugeMetricFamily(
            "appliance_slots", "Requests a model may run at once.", labels=["model"]
        )
        capacity = GaugeMetricFamily(
            "appliance_queue_capacity",
            "Requests that may wait for a model's slots (its queue_depth); past it, 503.",
            labels=["model"],
        )
        steps = CounterMetricFamily(
            "appliance_batch_steps",
            "Batch steps of a language model (one llama_decode each).",
            labels=["model"],
        )
        batch_tokens = CounterMetricFamily(
            "appliance_batch_tokens",
            "Tokens decoded in batch steps; over steps: the mean batch size.",
            labels=["model"],
        )
        batch_sequences = CounterMetricFamily(
            "appliance_batch_sequences",
            "Requests in batch steps; over steps: the mean streams per step.",
            labels=["model"],
        )
        kernels = GaugeMetricFamily(
            "appliance_llama_kernels",
            "1 for the llama.cpp CPU kernels a language model runs on (variant, and whether "
            "extra buffer types, i.e. repacked weights, are on).",
            labels=["model", "variant", "extra_buffers"],
        )
        layers = GaugeMetricFamily(
            "appliance_llama_layers",
            "A loaded language model's layers (its output layer counted) by where they run: "
            "on the GPU (gpu_layers) or the CPU; specialists run where their base does.",
            labels=["model", "on"],
        )
        for row in pool.state():
            if "placement" in row and row["state"] == "ready" and row["kind"] != "specialist":
                p = row["placement"]
                layers.add_metric([row["name"], "gpu"], float(p["offloaded"]))
                layers.add_metric([row["name"], "cpu"], float(p["layers"] - p["offloaded"]))
            if "kernels" in row:
                k = row["kernels"]
                kernels.add_metric(
                    [row["name"], k["variant"], str(k["extra_buffers"]).lower()], 1.0
                )
            loaded = row["state"] == "ready"
            state.add_metric([row["name"], row["format"]], 1.0 if loaded else 0.0)
            states.add_metric([row["name"], row["kind"], row["state"]], 1.0)
            loads.add_metric([row["name"]], float(row["loads"]))
            unloads.add_metric([row["name"]], float(row["unloads"]))
            if loaded:
                memory.add_metric([row["name"]], float(row["memory_bytes"]))
            if loaded:
                queued.add_metric([row["name"]], float(row["queued"]))
                busy.add_metric([row["name"]], float(row["running"]))
                slots.add_metric([row["name"]], float(row["slots"]))
                capacity.add_metric([row["name"]], float(row["queue_depth"]))
            if loaded and "kv_cache_usage" in row:
                kv_cache.add_metric([row["name"]], float(row["kv_cache_usage"]))
            if loaded and "steps" in row:
                steps.add_metric([row["name"]], float(row["steps"]))
                batch_tokens.add_metric([row["name"]], float(row["batch_tokens"]))
                batch_sequences.add_metric([row["name"]], float(row["batch_sequences"]))
        yield from (queued, busy, slots, capacity, kv_cache, steps, batch_tokens, batch_sequences)
        yield GaugeMetricFamily(
            "appliance_draining",
            "1 while this box is draining (/readyz 404: a balancer sends it no new work).",
            value=1.0 if get_drain(self.app).draining else 0.0,
        )
        yield from (state, kernels, layers)
        gpu_memory = GaugeMetricFamily(
            "appliance_gpu_memory_bytes",
            "Memory of each GPU llama.cpp sees (free, total), once a language model loaded.",
            labels=["device", "description", "kind"],
        )
        for device in self._gpus():
            for kind, amount in (("free", device.free_bytes), ("total", device.total_bytes)):
                gpu_memory.add_metric([device.name, device.description, kind], float(amount))
        yield gpu_memory
        expiry = certificate_expiry(self.app)
        if expiry is not None:
            yield GaugeMetricFamily(
                "appliance_tls_certificate_expiry_timestamp_seconds",
                "When the server's TLS certificate expires (Unix time).",
                value=expiry,
            )
        yield from (states, memory, loads, unloads)
        yield self._routes()
        budget = pool.budget_state()
        yield GaugeMetricFamily(
            "appliance_models_budget_bytes",
            "Memory the models may hold together (memory_limit_mb, or what was available "
            "at start less the reserve).",
            value=budget["capacity_bytes"],
        )
        yield GaugeMetricFamily(
            "appliance_models_budget_used_bytes",
            "Memory the loaded and loading models hold in the budget.",
            value=budget["used_bytes"],
        )
        rate = GaugeMetricFamily(
            "appliance_tokens_per_second",
            "Decode rate of the last finished generation.",
            labels=["model"],
        )
        for model, value in self.tokens_per_second.items():
            rate.add_metric([model], value)
        yield rate
        machine = psutil.virtual_memory()
        yield GaugeMetricFamily(
            "appliance_system_memory_available_bytes",
            "Memory available on the machine.",
            value=machine.available,
        )
        yield GaugeMetricFamily(
            "appliance_system_memory_total_bytes", "Memory of the machine.", value=machine.total
        )
        store = get_store(self.app)
        yield GaugeMetricFamily(
            "appliance_audit_writable",
            "1 while the audit log takes records.",
            value=1.0 if store.healthy else 0.0,
        )
        yield from _witness_gauges(self.app)
        yield from siem.gauges(self.app)
        temps = GaugeMetricFamily(
            "appliance_temperature_celsius", "Temperatures the hardware reports.", labels=["sensor"]
        )
        reader = getattr(psutil, "sensors_temperatures", None)
        for chip, entries in (reader() if reader else {}).items():
            for i, entry in enumerate(entries):
                temps.add_metric([f"{chip}/{entry.label or i}"], float(entry.current))
        yield temps


def _witness_gauges(app: Flask) -> Iterator[Metric]:
    """How much of the audit log the witness has not cosigned yet (with a witness)."""
    client = app.extensions.get(WITNESS)
    if client is None:
        return
    try:
        records, seconds = client.backlog()
    except Exception:  # a scrape must not fail on a read; the gauges are left out
        return
    yield GaugeMetricFamily(
        "appliance_audit_unwitnessed_records",
        "Audit records the witness has not cosigned yet.",
        value=records,
    )
    yield GaugeMetricFamily(
        "appliance_audit_unwitnessed_seconds",
        "Age of the oldest audit record the witness has not cosigned yet (0: none).",
        value=seconds,
    )
    yield GaugeMetricFamily(
        "appliance_audit_witness_ok",
        "1 while the last exchange with the witness gave a cosignature.",
        value=0.0 if client.last_error else 1.0,
    )


def init_app(app: Flask) -> Metrics:
    metrics = Metrics(app)
    app.extensions[EXTENSION] = metrics
    # The last hour of the key figures, for /status's charts (started with the app).
    metrics.history = History(metrics.registry)
    collector = metrics.state

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        ctx = context.current()

        def observe() -> None:
            elapsed = time.perf_counter() - ctx.started
            status = ctx.deferred_status or response.status_code
            metrics.observe(ctx, route, status, elapsed)
            tokens, seconds = ctx.usage.completion_tokens, ctx.usage.decode_seconds
            if tokens and seconds:
                collector.tokens_per_second[str(ctx.model)] = tokens / seconds

        if response.is_streamed:
            response.call_on_close(observe)
        else:
            observe()
        return response

    return metrics


@bp.get("/metrics")
def metrics() -> Response:
    registry = current_app.extensions[EXTENSION].registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
