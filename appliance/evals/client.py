"""The appliance's own API, as the eval and calibration commands call it: every case
goes through the real serving path (authentication, the audit log, the batcher), the
way a client's question does.

Run on the box, a command needs no token of its own: it makes a short-lived one (the
admin role, named for the command, audited as any token) and revokes it when done.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from appliance.config import Settings
from appliance.server import base_url
from appliance.tls import tls_enabled


class ApiFailure(RuntimeError):
    """The appliance refused or failed a call that should have been answered."""


@dataclass
class ChatResult:
    text: str
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] = field(default_factory=list)
    route: dict[str, Any] | None = None  # a route's decision
    model: str = ""


class Client:
    def __init__(self, url: str, token: str, ca: str | None = None, timeout: float = 300) -> None:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else True
        self.http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            verify=verify,
            timeout=timeout,
        )

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = self.http.post(path, json=body)
        if resp.status_code != 200:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:300]
            raise ApiFailure(f"{path} answered {resp.status_code}: {message}")
        data: dict[str, Any] = resp.json()
        return data

    def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        max_tokens: int,
        temperature: float = 0.0,
        logprobs: bool = False,
    ) -> ChatResult:
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if logprobs:
            body["logprobs"] = True
        started = time.perf_counter()
        data = self._post("/v1/chat/completions", body)
        latency = (time.perf_counter() - started) * 1000
        choice = data["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        usage = data.get("usage") or {}
        return ChatResult(
            text=choice["message"]["content"],
            latency_ms=latency,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            logprobs=[float(t["logprob"]) for t in content],
            route=data.get("appliance_route"),
            model=data.get("model", model),
        )

    def embed(self, model: str, texts: list[str]) -> np.ndarray:
        data = self._post("/v1/embeddings", {"model": model, "input": texts})
        rows = sorted(data["data"], key=lambda d: d["index"])
        return np.array([r["embedding"] for r in rows], dtype=np.float32)

    def infer(
        self, model: str, name: str, rows: np.ndarray, output: str
    ) -> tuple[np.ndarray, float]:
        """One Open Inference Protocol call: the output's values and the latency (ms)."""
        body = {
            "inputs": [
                {
                    "name": name,
                    "shape": list(rows.shape),
                    "datatype": "FP32",
                    "data": rows.astype(np.float32).ravel().tolist(),
                }
            ],
            "outputs": [{"name": output}],
        }
        started = time.perf_counter()
        data = self._post(f"/v2/models/{model}/infer", body)
        latency = (time.perf_counter() - started) * 1000
        out = next(o for o in data["outputs"] if o["name"] == output)
        return np.asarray(out["data"], dtype=np.float64).reshape(out["shape"]), latency

    def model(self, name: str) -> dict[str, Any]:
        resp = self.http.get(f"/v1/models/{name}")
        if resp.status_code == 200:
            data: dict[str, Any] = resp.json()
            return data
        resp = self.http.get(f"/v2/models/{name}")
        if resp.status_code != 200:
            raise ApiFailure(f"model {name!r}: {resp.status_code} {resp.text[:200]}")
        data = resp.json()
        return data

    def resident_mb(self) -> float | None:
        """The server's resident memory now (from /metrics), in MiB."""
        resp = self.http.get("/metrics")
        if resp.status_code != 200:
            return None
        for line in resp.text.splitlines():
            if line.startswith("process_resident_memory_bytes "):
                return float(line.split()[1]) / (1 << 20)
        return None


@contextmanager
def connect(
    settings: Settings, purpose: str, token: str | None = None, url: str | None = None
) -> Iterator[Client]:
    """A client of the appliance these settings describe; without a token, one made
    for ``purpose`` for an hour and revoked at the end."""
    from appliance.auth.store import AuthStore

    made = None
    if token is None:
        store = AuthStore(settings)
        made = store.create_token(purpose, "admin", "1h")
        token = made["token"]
    ca = str(settings.tls_dir / "ca.crt") if tls_enabled(settings) else None
    client = Client(url or base_url(settings), token, ca)
    try:
        yield client
    finally:
        client.close()
        if made is not None:
            AuthStore(settings).revoke_token(made["id"])
