"""kill -9 under mixed load, 100 times (issue #14; tests/test_campaign.py does 20):
after each restart `audit verify` passes and every request a client saw answered has
its record. Prints each cycle's figures and the totals. Usage:

    .venv/bin/python bench/crashloop.py [--cycles 100] [--seed 7]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from appliance.config import load_settings  # noqa: E402
from appliance.fetch import default_manifest  # noqa: E402
from appliance.registry import load_manifests  # noqa: E402

from campaign import crash_loop  # noqa: E402
from helpers import CACHE, make_state  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    manifest = default_manifest(
        load_manifests(load_settings(env={}, overrides={"state_dir": CACHE}))
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        state = make_state(Path(tmp) / "state", CACHE / "models" / manifest.file)
        results = crash_loop(state, manifest.name, args.cycles, args.seed)
    for r in results:
        print(
            f"cycle {r['cycle']:3d}: answered {r['answered']:3d}, cut {r['cut']}, "
            f"records {r['report']['records']}, incomplete {len(r['report']['incomplete'])}, "
            f"{'ok' if r['ok'] else 'FAILED: ' + str(r['report'].get('problem') or r['missing'])}"
        )
    survived = sum(r["ok"] for r in results)
    print(
        f"{survived}/{args.cycles} crashes survived with a verifying log and no answered "
        f"request unrecorded; {sum(r['answered'] for r in results)} answers, "
        f"{time.monotonic() - started:.0f} s"
    )
    sys.exit(0 if survived == args.cycles else 1)


if __name__ == "__main__":
    main()
