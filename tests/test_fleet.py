"""The fleet on one machine (tests/fleet.py): three appliances behind two HAProxy
balancers sharing a floating address with keepalived, as deploy/ ships them, driven
through that address. A conversation stays on one box and finds its beginning in that
box's KV cache; a drained box gets no new work; a client that gives up on a plain answer
stops the model of the box that took it (the balancer passes its close on); the address
moves when the active balancer dies and clients get answers again; a box stopped under
load (locust) loses no request and finishes its stream. Bounded: about two minutes."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fleet import VIP, Fleet, fleet, served_by, wait_until

pytestmark = [
    pytest.mark.server,
    pytest.mark.netns("10.77.0.0/24"),  # the fleet's addresses, in its own namespaces
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: the fleet's network namespaces (ip netns)"
    ),
]

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Iterator[Fleet]:
    with fleet(tmp_path_factory.mktemp("fleet"), model_file) as f:
        yield f


def chat(rig: Fleet, messages: list[dict[str, str]], key: str | None = None) -> httpx.Response:
    def call() -> httpx.Response:
        with rig.http() as client:
            headers = {"X-Conversation-Id": key} if key else {}
            body = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0}
            return client.post("/v1/chat/completions", json=body, headers=headers)

    return rig.in_client(call)


def locust(rig: Fleet, seconds: int, users: int = 4) -> subprocess.Popen[bytes]:
    out = rig.work / f"locust-{time.monotonic_ns()}"
    cmd = ["ip", "netns", "exec", rig.ns("client"), sys.executable, "-m", "locust"]
    cmd += ["-f", str(Path(__file__).with_name("fleet_locustfile.py")), "--headless"]
    cmd += ["-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--host", f"https://{VIP}"]
    cmd += ["--csv", str(out), "--only-summary", "--stop-timeout", "30"]
    env = {**os.environ, "FLEET_CA": str(rig.client_ca), "FLEET_TOKEN": rig.token}
    log = (rig.work / f"{out.name}.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.csv = out  # type: ignore[attr-defined]
    return proc


def locust_totals(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.wait(120) in (0, 1)  # 1: some requests failed (read on)
    path = Path(f"{proc.csv}_stats.csv")  # type: ignore[attr-defined]
    with path.open() as fh:
        row = next(r for r in csv.DictReader(fh) if r["Name"] == "Aggregated")
    with Path(f"{proc.csv}_failures.csv").open() as fh:  # type: ignore[attr-defined]
        why = [f"{r['Occurrences']} x {r['Error']}" for r in csv.DictReader(fh)]
    return {
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        "why": why,
    }


def test_a_conversation_stays_on_one_box_and_finds_its_cache(rig: Fleet) -> None:
    boxes: dict[str, set[str]] = {}
    for n in range(6):
        messages = [
            {"role": "system", "content": f"You assist line {n} of the paint shop. " * 4},
            {"role": "user", "content": f"What is the status of robot {n}?"},
        ]
        first = chat(rig, messages)
        assert first.status_code == 200, first.text
        key = first.headers["X-Conversation-Id"]  # derived from the beginning
        seen = {served_by(first)}
        for turn in range(2):
            messages += [
                first.json()["choices"][0]["message"],
                {"role": "user", "content": f"And after step {turn}?"},
            ]
            follow = chat(rig, messages, key)
            assert follow.status_code == 200 and follow.headers["X-Conversation-Id"] == key
            seen.add(served_by(follow))
            cached = follow.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached >= first.json()["usage"]["prompt_tokens"] - 2, follow.json()["usage"]
            first = follow
        assert len(seen) == 1, seen  # every turn on the box that holds the conversation
        boxes[key] = seen
    assert len(set().union(*boxes.values())) >= 2  # and conversations spread over boxes


def test_a_drained_box_gets_no_new_work(rig: Fleet) -> None:
    assert rig.box_post("box2", "/admin/drain", {"draining": True}).status_code == 200
    try:
        assert rig.box_get("box2", "/readyz").status_code == 404
        # The balancer checks /readyz every second; its 404 takes the box out of the
        # balance (NOLB). On a loaded machine a check can come late: wait for it.
        active = rig.vip_holder()
        assert active is not None
        assert wait_until(lambda: rig.balancer_sees(active, "box2") == "NOLB", 10), (
            rig.balancer_sees(active, "box2")
        )
        landed = [served_by(chat(rig, [{"role": "user", "content": f"q {i}"}])) for i in range(12)]
        assert "box2" not in landed and landed.count("?") == 0, landed
    finally:
        assert rig.box_post("box2", "/admin/drain", {"draining": False}).status_code == 200

    def box2_takes_work() -> bool:
        keys = [f"after-{i}" for i in range(24)]
        return any(
            served_by(chat(rig, [{"role": "user", "content": k}], k)) == "box2" for k in keys
        )

    assert wait_until(box2_takes_work, 30, interval=1)


def test_a_client_that_gives_up_through_the_balancer_stops_its_model(rig: Fleet) -> None:
    """A plain answer's client that leaves (its own timeout) through the balancer: the
    balancer passes the close on, and the box that took the request stops its model."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": 1500,  # ~13 s on a 2-core box; the client leaves at 2 s
        "ignore_eos": True,
    }

    def give_up() -> bool:
        with rig.http() as client:
            try:
                client.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=2))
            except httpx.ReadTimeout:
                return True
        return False

    def running() -> dict[str, int]:
        states = {b: rig.box_get(b, "/readyz").json()["models"] for b in rig.box_names()}
        return {b: sum(m.get("running", 0) for m in models) for b, models in states.items()}

    assert rig.in_client(give_up)
    assert wait_until(lambda: not any(running().values()), 6, interval=0.5), running()


def test_the_address_moves_when_the_active_balancer_dies(rig: Fleet) -> None:
    active = rig.vip_holder()
    assert active is not None
    standby = "lb2" if active == "lb1" else "lb1"
    load = locust(rig, 20)
    time.sleep(6)
    killed = time.monotonic()
    # The machine dies: its processes, and its network link (with the address on it).
    for name in (f"keepalived-{active}", f"haproxy-{active}"):
        rig.procs[name].signal(signal.SIGKILL)
    subprocess.run(["ip", "-n", rig.ns(active), "link", "del", "eth0"], check=True)

    def answered() -> bool:
        with rig.http() as client:
            return client.get("/readyz", timeout=2).status_code == 200

    assert wait_until(lambda: rig.in_client(answered), 30, interval=0.2)
    failover = time.monotonic() - killed
    assert rig.vip_holder() == standby
    totals = locust_totals(load)
    print(f"failover {failover:.1f} s; locust {totals}")
    # Only requests in flight on the dead balancer fail (one per simulated client at most);
    # the clients reconnect to the address, now on lb2, and get answers.
    assert totals["requests"] > 10 and totals["failures"] <= 4, totals
    assert chat(rig, [{"role": "user", "content": "after"}]).status_code == 200


def test_stopping_a_box_under_load_loses_nothing(rig: Fleet) -> None:
    stream_done: list[Any] = []

    def stream_from_box3() -> None:
        # A key the ring sends to box3, found by asking.
        for i in range(64):
            key = f"s-{i}"
            probe = chat(rig, [{"role": "user", "content": "x"}], key)
            if served_by(probe) == "box3":
                break
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to 40."}]}
        body |= {"max_tokens": 40, "stream": True}
        with (
            rig.http() as client,
            client.stream(
                "POST", "/v1/chat/completions", json=body, headers={"X-Conversation-Id": key}
            ) as resp,
        ):
            stream_done.append(served_by(resp))
            stream_done.extend(line for line in resp.iter_lines() if line.startswith("data: "))

    load = locust(rig, 25)
    streaming = rig.client_pool().submit(stream_from_box3)
    assert wait_until(lambda: len(stream_done) >= 3, 60)
    box3 = rig.procs["box3"]
    box3.signal(signal.SIGTERM)  # drains 3 s (/readyz 404), then stops accepting
    assert box3.popen.wait(90) == 0, box3.tail()
    streaming.result(90)
    totals = locust_totals(load)
    print(f"stop under load: locust {totals}")
    assert stream_done[0] == "box3" and stream_done[-1] == "data: [DONE]", stream_done[-3:]
    assert totals["requests"] > 10 and totals["failures"] == 0, totals
