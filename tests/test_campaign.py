"""The standing campaign, short (issue #14): kill -9 under mixed load, fuzzing every
route from /openapi.json, and no network use but loopback. bench/crashloop.py and
bench/soak.py run the long forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from campaign import crash_loop
from helpers import make_state

pytestmark = pytest.mark.server


def test_kill_9_under_load_loses_no_answered_request(
    tmp_path: Path, model_file: Path, model_name: str
) -> None:
    """20 times: the server under mixed load (chat, streams, tensors, listings,
    refusals) is killed at a random moment; after each, `audit verify` passes and every
    request a client saw answered has its record."""
    state = make_state(tmp_path / "state", model_file)
    results = crash_loop(state, model_name, cycles=20)
    assert len(results) == 20 and all(r["ok"] for r in results), results[-1]
    assert sum(r["answered"] for r in results) >= 40  # there was load to lose
    assert any(r["report"]["incomplete"] for r in results)  # and kills mid-request
