"""The load for tests/test_fleet.py: each simulated client keeps one conversation (its
own X-Conversation-Id) and asks short questions through the floating address."""

from __future__ import annotations

import os
import uuid

from locust import HttpUser, constant, task


class LineSystem(HttpUser):
    wait_time = constant(0.2)

    def on_start(self) -> None:
        self.client.verify = os.environ["FLEET_CA"]
        self.client.headers["Authorization"] = "Bearer " + os.environ["FLEET_TOKEN"]
        self.client.headers["X-Conversation-Id"] = "line-" + uuid.uuid4().hex[:12]

    @task
    def ask(self) -> None:
        body = {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "Status of press 4?"}],
            "max_tokens": 4,
        }
        self.client.post("/v1/chat/completions", json=body, name="chat", timeout=60)
