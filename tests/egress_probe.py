"""Run inside a network namespace that has only loopback (tests/test_campaign.py starts
it with `unshare --net`): the real server under strace, a round of everything a user
does, then a stop. strace's record of every connect, sendto and sendmsg is what the
test reads.

    python tests/egress_probe.py STATE_DIR TRACE_FILE MODEL
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from helpers import start_server


def main() -> None:
    state, trace, model = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    strace = ("strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,bind", "-o", trace)
    server = start_server(state, prefix=strace)
    try:
        with server.client() as client:
            chat = {
                "model": model,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "Hi"}],
            }
            assert client.post("/v1/chat/completions", json=chat).status_code == 200
            with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
                assert r.status_code == 200 and "[DONE]" in "".join(r.iter_text())
            tensor = {
                "inputs": [
                    {
                        "name": "readings",
                        "shape": [1, 4],
                        "datatype": "FP32",
                        "data": [2.0, 50.0, 55.0, 12.0],
                    }
                ]
            }
            assert client.post("/v2/models/line-anomaly/infer", json=tensor).status_code == 200
            for path in ("/v1/models", "/status", "/login", "/metrics", "/readyz", "/openapi.json"):
                assert client.get(path).status_code == 200, path
            assert client.get("/audit/verify").json()["ok"]
    finally:  # SIGTERM to strace and the server alike: a graceful stop, traced to the end
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(60)


if __name__ == "__main__":
    main()
