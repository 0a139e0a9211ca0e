"""The fleet on one machine (tests/fleet.py: three appliances in network namespaces,
two HAProxy balancers with keepalived holding a floating address, deploy/'s configs),
measured through the floating address. Needs root, haproxy and keepalived.

1. Multi-turn conversations about a document (each opens with a shift's maintenance
   log of ~500 tokens, then asks short follow-ups; several at once, each turn waiting
   for the last), with
   conversation hashing (the shipped config: X-Conversation-Id, consistent hash with
   bounded load, learnt on the first answer) against round-robin on a second rig:
   time to first token of the follow-up turns (p50, p95) and the prefix-cache hit rate
   (prompt tokens found in the box's KV cache over all prompt tokens of follow-ups).
2. Failover: the active balancer dies (processes and link); seconds until a request
   through the floating address is answered again.
3. A drain under load: SIGTERM a box while clients send requests; requests lost.
4. What the balancer adds per request: the same small request straight to a box and
   through the floating address (p50 of each).

Targets: hashing >= 2x lower TTFT p50 on follow-up turns; 0 requests lost in a drain.
Throughput scaling needs separate machines (here every box shares the same 2 cores).

    sudo .venv/bin/python bench/fleet.py [--conversations 12] [--turns 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.engines.kernels import cpu_model  # noqa: E402
from tests.fleet import BOX_PORT, Fleet, fleet, served_by, wait_until  # noqa: E402
from tests.helpers import default_model_file  # noqa: E402

MODEL = "smollm2-135m-instruct"
TOPICS = ["press 4", "the paint robot", "line 2 torque", "the oven", "conveyor B", "the chiller"]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stream_turn(rig: Fleet, messages: list[dict[str, str]], key: str | None) -> dict[str, Any]:
    """One streamed turn: time to first token, the answer, its usage and the box."""
    body = {"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    headers = {"X-Conversation-Id": key} if key else {}
    started = time.perf_counter()
    first: float | None = None
    text, usage = "", {}
    with (
        rig.http() as client,
        client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status_code == 200, resp.read()
        box, key = served_by(resp), resp.headers.get("X-Conversation-Id", key)
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text += piece
            usage = chunk.get("usage") or usage
    ttft = (first or time.perf_counter()) - started
    return {"ttft": ttft, "text": text, "usage": usage, "box": box, "key": key}


SYSTEM = (
    "You are the maintenance assistant of the plant. Answer in one short sentence, "
    "from the log the technician gives you; say so when the log does not tell."
)


def shift_log(n: int, lines: int = 40) -> str:
    """A conversation's own document: a shift's maintenance log (about 12 tokens a line),
    what a technician pastes in and then asks about, turn after turn."""
    topic = TOPICS[n % len(TOPICS)]
    return "\n".join(
        f"{6 + i // 4:02d}:{(i * 7) % 60:02d} {topic} unit {n}-{i}: "
        f"reading {(n * 31 + i * 17) % 97} within limits, checked by shift {n % 3 + 1}"
        for i in range(lines)
    )


def conversation(rig: Fleet, n: int, turns: int) -> list[dict[str, Any]]:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Shift log:\n{shift_log(n)}\n\nWhat should I check first?"},
    ]
    key: str | None = None
    out = []
    for turn in range(turns):
        result = stream_turn(rig, messages, key)
        key = result["key"]
        out.append({**result, "turn": turn})
        messages += [
            {"role": "assistant", "content": result["text"]},
            {"role": "user", "content": f"And then, step {turn + 2}?"},
        ]
    return out


def multi_turn(rig: Fleet, conversations: int, turns: int, parallel: int) -> dict[str, Any]:
    with ThreadPoolExecutor(parallel, initializer=_enter, initargs=(rig,)) as pool:
        runs = list(pool.map(lambda n: conversation(rig, n, turns), range(conversations)))
    follow = [t for run in runs for t in run if t["turn"] > 0]
    prompt = sum(t["usage"]["prompt_tokens"] for t in follow)
    cached = sum(t["usage"]["prompt_tokens_details"]["cached_tokens"] for t in follow)
    ttfts = [t["ttft"] * 1000 for t in follow]
    moved = sum(len({t["box"] for t in run}) > 1 for run in runs)
    return {
        "follow_up_turns": len(follow),
        "ttft_ms_p50": round(statistics.median(ttfts), 1),
        "ttft_ms_p95": round(quantile(ttfts, 0.95), 1),
        "prefix_cache_hit_rate": round(cached / prompt, 3),
        "conversations_that_moved_between_boxes": moved,
        "first_turn_ttft_ms_p50": round(
            statistics.median(t["ttft"] * 1000 for run in runs for t in run if t["turn"] == 0), 1
        ),
    }


def _enter(rig: Fleet) -> None:
    from tests.fleet import enter_netns

    enter_netns(rig.ns("client"))


def balancer_overhead(rig: Fleet, n: int = 300) -> dict[str, float]:
    """The same small request (/healthz: no model, no audit write), on kept-alive TLS
    connections, straight to a box and through the floating address, interleaved so
    that both see the same machine load."""

    def run() -> dict[str, float]:
        import httpx

        ca = str(rig.work / "box1" / "state/tls/ca.crt")
        url = f"https://{rig.address('box1')}:{BOX_PORT}/healthz"
        straight: list[float] = []
        through: list[float] = []
        with httpx.Client(verify=ca) as direct, rig.http() as vip:
            direct.get(url), vip.get("/healthz")  # connections open, TLS done
            for _ in range(n):
                for client, target, out in ((direct, url, straight), (vip, "/healthz", through)):
                    started = time.perf_counter()
                    assert client.get(target).status_code == 200
                    out.append((time.perf_counter() - started) * 1000)
        return {
            "direct_ms_p50": round(statistics.median(straight), 2),
            "through_balancer_ms_p50": round(statistics.median(through), 2),
        }

    out = rig.in_client(run)
    out["balancer_adds_ms"] = round(out["through_balancer_ms_p50"] - out["direct_ms_p50"], 2)
    return out


def drain_under_load(rig: Fleet, seconds: float = 20) -> dict[str, Any]:
    stop = threading.Event()
    results: list[int] = []

    def client(i: int) -> None:
        _enter(rig)
        with rig.http() as http:
            while not stop.is_set():
                body = {
                    "model": MODEL,
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": f"status {i}"}],
                }
                try:
                    code = http.post("/v1/chat/completions", json=body).status_code
                except Exception:  # a lost request: counted, never raised
                    code = 0
                results.append(code)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(seconds / 3)
    rig.procs["box3"].signal(signal.SIGTERM)
    exited = rig.procs["box3"].popen.wait(90)
    time.sleep(seconds / 3)
    stop.set()
    for t in threads:
        t.join(120)
    return {
        "requests": len(results),
        "lost": sum(1 for c in results if c != 200),
        "box_exit_code": exited,
    }


def failover(rig: Fleet) -> dict[str, Any]:
    active = rig.vip_holder()
    assert active is not None

    def answered() -> bool:
        with rig.http() as client:
            return client.get("/readyz", timeout=1).status_code == 200

    killed = time.monotonic()
    for name in (f"keepalived-{active}", f"haproxy-{active}"):
        rig.procs[name].signal(signal.SIGKILL)
    subprocess.run(["ip", "-n", rig.ns(active), "link", "del", "eth0"], check=True)
    assert wait_until(lambda: rig.in_client(answered), 60, interval=0.05)
    return {"failover_seconds": round(time.monotonic() - killed, 2), "new_holder": rig.vip_holder()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=9)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = default_model_file()
    report: dict[str, Any] = {"cpu": cpu_model(), "model": model.name, "boxes": 3}
    for balance in ("hash", "roundrobin"):
        with (
            tempfile.TemporaryDirectory() as work,
            fleet(Path(work), model, balance=balance) as rig,
        ):
            print(f"{balance}: multi-turn conversations...", flush=True)
            report[balance] = multi_turn(rig, args.conversations, args.turns, args.parallel)
            if balance == "hash":
                report["balancer"] = balancer_overhead(rig)
                report["drain"] = drain_under_load(rig)
                report["failover"] = failover(rig)
    report["ttft_p50_round_robin_over_hashing"] = round(
        report["roundrobin"]["ttft_ms_p50"] / report["hash"]["ttft_ms_p50"], 2
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
