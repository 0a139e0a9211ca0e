"""The line's maintenance log, made by the project: a technician's note about a machine
on the line, and the defect code the plant's handbook gives it. The codes are this
plant's own, so no model knows them until it is taught: the task on which a small
specialist beats a larger generalist.

    python models/line/maintenance.py OUT.jsonl [--count 300] [--seed 7]

writes OpenAI fine-tuning JSONL ({"messages": [system, user, assistant]} per line).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = "Answer with the defect code from the maintenance handbook, nothing else."

# code -> ways technicians describe it (the handbook's symptoms, in their words)
SYMPTOMS: dict[str, list[str]] = {
    "BRG-WEAR": [
        "grinding noise from the spindle bearing",
        "rough rumble at the drive-end bearing",
        "bearing housing vibrates and rattles",
        "metal dust around the bearing seal",
        "bearing whines louder every shift",
    ],
    "OVERHEAT": [
        "motor casing too hot to touch",
        "thermal alarm on the motor, smell of hot varnish",
        "gearbox oil is smoking",
        "temperature reading climbs past the red line",
        "paint blistering on the motor housing",
    ],
    "OVERLOAD": [
        "breaker tripped under full load",
        "motor stalls when the belt is loaded",
        "current draw spikes when the press closes",
        "drive faults out with an overcurrent error",
        "fuse blew as the conveyor started with product on it",
    ],
    "BELT-SLIP": [
        "belt squeals at start-up",
        "conveyor belt slips on the drive pulley",
        "glazed belt, speed drops under load",
        "belt tracking wanders and it chirps",
        "black rubber dust under the belt guard",
    ],
    "LEAK-HYD": [
        "hydraulic oil puddle under the press",
        "hose weeping at the cylinder fitting",
        "pressure drops slowly with the valve closed",
        "oil mist around the pump seal",
        "reservoir level falls every shift",
    ],
}
MACHINES = ["press", "conveyor", "mixer", "pump", "packer", "lathe", "filler", "labeller"]
OPENINGS = ["", "Shift note: ", "Log: ", "Technician reports: ", "Ticket: "]
CLOSINGS = ["", " Please advise.", " Line still running.", " Stopped for safety.", " Seen twice today."]


def examples(count: int, seed: int) -> list[dict[str, list[dict[str, str]]]]:
    rng = random.Random(seed)
    codes = sorted(SYMPTOMS)
    out = []
    for i in range(count):
        code = codes[i % len(codes)]
        line = rng.randint(1, 9)
        note = (
            f"{rng.choice(OPENINGS)}line {line}, {rng.choice(MACHINES)} "
            f"{rng.randint(1, 4)}: {rng.choice(SYMPTOMS[code])}.{rng.choice(CLOSINGS)}"
        )
        out.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": note},
                    {"role": "assistant", "content": code},
                ]
            }
        )
    rng.shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with args.out.open("w", encoding="utf-8") as fh:
        for example in examples(args.count, args.seed):
            fh.write(json.dumps(example) + "\n")


if __name__ == "__main__":
    main()
