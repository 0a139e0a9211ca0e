"""Skips are loud and reviewed: a run that skips a test for a reason outside
ALLOWED_SKIPS fails, and an allowed reason passes only where its condition holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import allowed_skip

TESTS = Path(__file__).parent


def run(tmp_path: Path, reason: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_one.py").write_text(
        "import pytest\n\n\ndef test_skipped() -> None:\n"
        f"    pytest.skip({reason!r})\n\n\ndef test_ran() -> None:\n    assert True\n"
    )
    # The suite's own hooks, as a plugin, on a file of one skipped test.
    (tmp_path / "skipcheck.py").write_text(
        "from conftest import pytest_runtest_logreport, pytest_sessionfinish  # noqa: F401\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{tmp_path}"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "skipcheck", "-rs",
         "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path / "test_one.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip


def test_an_unreviewed_skip_fails_the_run(tmp_path: Path) -> None:
    done = run(tmp_path, "the network was slow today")
    assert done.returncode == 1, done.stdout
    assert "skips not in the reviewed list" in done.stdout
    assert "the network was slow today" in done.stdout  # -rs says why


def test_a_reviewed_skip_passes_only_where_it_holds(tmp_path: Path) -> None:
    done = run(tmp_path, "needs root: mounts a tmpfs")
    root = os.geteuid() == 0
    assert (done.returncode == 0) == (not root), done.stdout
    assert allowed_skip("needs root: x") == (not root)
    assert not allowed_skip("cannot mount a small filesystem here")
