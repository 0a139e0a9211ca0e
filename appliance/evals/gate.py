"""The promotion gate: a candidate replaces the champion behind a served name only
when its eval says it may. It is refused, with the numbers, when its score is below
the suite's threshold, or worse than the champion's by more than the suite's margin,
overall or in any tagged group both were scored on."""

from __future__ import annotations

from typing import Any


def judge(
    suite: dict[str, Any], candidate: dict[str, Any], champion: dict[str, Any] | None
) -> list[str]:
    """Why the candidate may not be promoted (empty: it may). ``candidate`` and
    ``champion`` are a run report's model entries on this suite."""
    name, score = candidate["model"], candidate["score"]
    problems = []
    if score is None:  # a metric undefined on this suite (one class only, for AUC)
        return [f"{name} has no {candidate.get('metric', 'score')} on {suite['name']}"]
    if candidate.get("errors"):
        problems.append(f"{name} failed {candidate['errors']} of {candidate['cases']} cases")
    threshold = suite.get("threshold")
    if threshold is not None and score < threshold:
        problems.append(
            f"{name} scores {score:.3f} on {suite['name']}; the suite's threshold is "
            f"{threshold:.3f}"
        )
    if champion is None:
        return problems
    margin = float(suite.get("margin") or 0.0)
    best = champion["score"]
    if best is not None and score < best - margin:
        problems.append(
            f"{name} scores {score:.3f} against champion {champion['model']}'s {best:.3f} "
            f"(allowed margin {margin:.3f})"
        )
    for tag, groups in sorted(candidate.get("tags", {}).items()):
        for value, group in sorted(groups.items()):
            theirs = champion.get("tags", {}).get(tag, {}).get(value)
            if theirs is None or group["score"] is None or theirs["score"] is None:
                continue  # a group only one was scored on, or undefined in it
            if group["score"] < theirs["score"] - margin:
                problems.append(
                    f"in {tag}={value}: {name} scores {group['score']:.3f} against "
                    f"{champion['model']}'s {theirs['score']:.3f} (allowed margin {margin:.3f})"
                )
    return problems
