"""Routing and promotion's pure logic, against numbers worked out by hand: the
calibration of a route's thresholds (similarity, then the two confidences), a route's
config and calibration files (and each way a config can be wrong), the router's
confidence and question, the promotion gate, served names (promote, resolve, roll
back) and saved eval runs. No model, no server: well under a second."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from appliance.evals.gate import judge
from appliance.evals.runner import audit_summary, finite, latest
from appliance.evals.suite import Suite, load_suite
from appliance.problems import Invalid
from appliance.routing.calibrate import (
    NEVER,
    Observation,
    calibrate,
    outcomes,
    similarity_threshold,
)
from appliance.routing.router import confidence, question_of
from appliance.routing.spec import (
    Calibration,
    Route,
    RouteError,
    RouteTable,
    calibration_path,
    read_route,
    write_calibration,
)
from appliance.serving.aliases import AliasError, AliasTable

# --- calibration ------------------------------------------------------------------


def obs(
    case: str,
    domain: str | None,
    nearest: str,
    sim: float,
    spec: tuple[float, bool],
    gen: tuple[float, bool],
) -> Observation:
    other = "beta" if nearest == "alpha" else "alpha"
    return Observation(
        case=case,
        domain=domain,
        similarities={nearest: sim, other: sim / 2},
        nearest=nearest,
        specialist_confidence=spec[0],
        specialist_correct=spec[1],
        generalist_confidence=gen[0],
        generalist_correct=gen[1],
    )


# Six cases, by their best similarity:
#   o1 alpha 0.9   spec 0.9 right   gen 0.5 wrong
#   o2 beta  0.8   spec 0.6 wrong   gen 0.7 right
#   o3 alpha 0.7   spec 0.4 wrong   gen 0.3 wrong
#   o4 off   0.6   spec 0.8 right   gen 0.9 right   (nearest alpha)
#   o5 off   0.4   spec 0.2 wrong   gen 0.6 right   (nearest beta)
#   o6 alpha 0.3   spec 0.95 right  gen 0.8 wrong   (in-domain, but far from it)
SIX = [
    obs("o1", "alpha", "alpha", 0.9, (0.9, True), (0.5, False)),
    obs("o2", "beta", "beta", 0.8, (0.6, False), (0.7, True)),
    obs("o3", "alpha", "alpha", 0.7, (0.4, False), (0.3, False)),
    obs("o4", None, "alpha", 0.6, (0.8, True), (0.9, True)),
    obs("o5", None, "beta", 0.4, (0.2, False), (0.6, True)),
    obs("o6", "alpha", "alpha", 0.3, (0.95, True), (0.8, False)),
]


def test_similarity_threshold_sits_between_the_best_neighbours() -> None:
    # Candidates and cases routed where they belong:
    #   0.3-1e-6: o1 o2 o3 o6 right, o4 o5 to a specialist: 4
    #   0.35: o6 now to the generalist: 3      0.5: o5 to the generalist: 4
    #   0.65: o4 too: o1 o2 o3 o4 o5 = 5 (the best, alone)
    #   0.75: o3 lost: 4    0.85: 3    0.9+1e-6: 2
    threshold, accuracy = similarity_threshold(SIX)
    assert threshold == pytest.approx(0.65)
    assert accuracy == pytest.approx(5 / 6)


def test_similarity_threshold_takes_the_middle_of_ties() -> None:
    # Best similarities 0.2 alpha, 0.4 off, 0.6 alpha, 0.8 off.
    #   0.2-1e-6: 0.2 and 0.6 right = 2;  0.3: only 0.6 = 1;  0.5: 0.4 and 0.6 = 2
    #   0.7: only 0.4 = 1;  0.8+1e-6: 0.4 and 0.8 = 2  -> three tie; the middle is 0.5
    four = [
        obs("a", "alpha", "alpha", 0.2, (0.5, True), (0.5, True)),
        obs("b", None, "alpha", 0.4, (0.5, True), (0.5, True)),
        obs("c", "alpha", "alpha", 0.6, (0.5, True), (0.5, True)),
        obs("d", None, "beta", 0.8, (0.5, True), (0.5, True)),
    ]
    threshold, accuracy = similarity_threshold(four)
    assert threshold == pytest.approx(0.5)
    assert accuracy == pytest.approx(0.5)


def test_outcomes_count_correct_wrong_and_referred() -> None:
    # At similarity 0.65 o1 o2 o3 ask their specialist first; o4 o5 o6 the generalist.
    # spec 0.8, gen 0.5: o1 spec right; o2 gen right; o3 referred; o4 o5 right; o6 wrong
    assert outcomes(SIX, 0.65, 0.8, 0.5) == (4, 1, 1)
    # gen 0.3: o3 answered by the generalist, wrongly
    assert outcomes(SIX, 0.65, 0.8, 0.3) == (4, 2, 0)
    # No specialist at all (NEVER): o1 falls to the generalist, wrong
    assert outcomes(SIX, 0.65, NEVER, 0.3) == (3, 3, 0)
    # Every case to its specialist (similarity 0), all confident: o1 o4 o6 right
    assert outcomes(SIX, 0.0, 0.0, 0.0) == (3, 3, 0)
    # Thresholds are inclusive: o1 at exactly 0.9, o5 at exactly 0.6, o3 at sim 0.7
    assert outcomes(SIX, 0.7, 0.9, 0.6) == (4, 1, 1)
    assert outcomes(SIX, 0.65, NEVER, NEVER) == (0, 0, 6)


def route_toml(generalist: str = "gen", extra: str = "") -> str:
    return (
        'description = "the maintenance desk"\n'
        'embedding = "minilm"\n'
        f'generalist = "{generalist}"\n'
        'referral = "Ask the line supervisor."\n'
        'roles = ["line", "admin"]\n'
        f"{extra}"
        "\n[[specialists]]\n"
        'model = "alpha"\n'
        'description = "spindles"\n'
        'examples = ["grinding noise", "belt squeals"]\n'
        "\n[[specialists]]\n"
        'model = "beta"\n'
        'description = "conveyors"\n'
    )


def make_route(tmp_path: Path) -> Route:
    path = tmp_path / "routes" / "desk.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(route_toml())
    return read_route(path)


def make_suite(tmp_path: Path) -> Suite:
    path = tmp_path / "desk-cal.jsonl"
    lines: list[dict[str, Any]] = [{"suite": {"name": "desk-cal"}}]
    for o in SIX:
        tags = {"domain": o.domain} if o.domain else {}
        lines.append({"id": o.case, "prompt": f"question {o.case}", "expected": "x", "tags": tags})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return load_suite(path)


def test_calibrate_maximises_correct_answers_within_the_target(tmp_path: Path) -> None:
    route, suite = make_route(tmp_path), make_suite(tmp_path)
    # At most 25 % wrong: 4 right (o1 o2 o4 o5) is the most any setting gets; (4, 2, 0)
    # is 33 % wrong, (4, 1, 1) is 20 %: spec in {0.8, 0.9}, gen in {0.5, 0.6}.
    cal = calibrate(SIX, route, suite, 0.25)
    assert cal.similarity == pytest.approx(0.65)
    assert cal.specialist_confidence in (0.8, 0.9)
    assert cal.generalist_confidence in (0.5, 0.6)
    assert outcomes(SIX, cal.similarity, cal.specialist_confidence, cal.generalist_confidence) == (
        4,
        1,
        1,
    )
    m = cal.measured
    assert m["cases"] == 6
    assert m["routing_accuracy"] == 0.8333
    assert m["accuracy"] == 0.6667
    assert m["wrong_among_answered"] == 0.2
    assert m["wrong_among_answered"] <= cal.target_error == 0.25
    assert m["referral_rate"] == 0.1667
    assert m["refers_everything"] is False
    assert [o["case"] for o in m["observations"]] == ["o1", "o2", "o3", "o4", "o5", "o6"]
    assert m["observations"][3] == {
        "case": "o4",
        "domain": None,
        "nearest": "alpha",
        "similarity": 0.6,
        "specialist": [0.8, True],
        "generalist": [0.9, True],
    }
    assert cal.suite == str(suite.path)
    assert cal.suite_sha256 == suite.sha256


def test_calibrate_prefers_fewer_wrong_among_equally_correct(tmp_path: Path) -> None:
    # Any error allowed: (4, 2, 0) with gen 0.3 and (4, 1, 1) with gen 0.5 tie on
    # correct answers; the fewer wrong wins. (correct + wrong + referred is always the
    # number of cases, so fewer referrals never decides between two such settings.)
    cal = calibrate(SIX, make_route(tmp_path), make_suite(tmp_path), 1.0)
    assert cal.generalist_confidence in (0.5, 0.6)
    assert cal.measured["accuracy"] == 0.6667
    assert cal.measured["wrong_among_answered"] == 0.2


def test_calibrate_with_no_error_allowed_answers_only_sure_cases(tmp_path: Path) -> None:
    # No wrong answer allowed: spec in {0.8, 0.9} (o1) and gen 0.9 (o4): (2, 0, 4);
    # gen NEVER would give (1, 0, 5), fewer right.
    cal = calibrate(SIX, make_route(tmp_path), make_suite(tmp_path), 0.0)
    assert cal.specialist_confidence in (0.8, 0.9)
    assert cal.generalist_confidence == 0.9
    assert cal.measured["accuracy"] == 0.3333
    assert cal.measured["wrong_among_answered"] == 0.0
    assert cal.measured["referral_rate"] == 0.6667
    assert cal.measured["refers_everything"] is False


def test_calibrate_refers_everything_when_nothing_meets_the_target(tmp_path: Path) -> None:
    always_wrong = [
        obs("o1", "alpha", "alpha", 0.9, (0.9, False), (0.8, False)),
        obs("o2", None, "beta", 0.2, (0.3, False), (0.7, False)),
    ]
    cal = calibrate(always_wrong, make_route(tmp_path), make_suite(tmp_path), 0.1)
    assert cal.specialist_confidence == NEVER == 1.0 + 1e-9
    assert cal.generalist_confidence == NEVER
    assert cal.measured["refers_everything"] is True
    assert cal.measured["accuracy"] == 0.0
    assert cal.measured["referral_rate"] == 1.0
    assert cal.measured["wrong_among_answered"] == 0.0


# --- route config -----------------------------------------------------------------


def write_route(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def test_a_good_route_is_read(tmp_path: Path) -> None:
    path = write_route(tmp_path, "desk", route_toml())
    route = read_route(path)
    assert route.name == "desk"
    assert route.path == path
    assert route.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert route.embedding == "minilm"
    assert route.generalist == "gen"
    assert route.referral == "Ask the line supervisor."
    assert route.roles == ("line", "admin")
    assert [d.model for d in route.specialists] == ["alpha", "beta"]
    assert route.specialists[0].texts() == ["spindles", "grinding noise", "belt squeals"]
    assert route.specialists[1].examples == ()
    assert route.models() == ["alpha", "beta", "gen"]
    assert route.calibration is None


HEAD = 'embedding = "e"\ngeneralist = "gen"\nreferral = "ask"\n'
ALPHA = '[[specialists]]\nmodel = "alpha"\ndescription = "a"\n'


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("desk", HEAD + 'colour = "red"\n' + ALPHA, "unknown keys colour"),
        ("desk", HEAD, "at least one [[specialists]]"),
        ("desk", HEAD + "specialists = []\n", "at least one [[specialists]]"),
        ("desk", HEAD + ALPHA + ALPHA, "a specialist is listed twice"),
        ("desk", HEAD + ALPHA.replace('"alpha"', '"gen"'), "'gen' is also a specialist"),
        ("desk", HEAD + ALPHA + 'examples = "one"\n', "examples must be a list"),
        ("desk", HEAD + ALPHA + 'examples = ["ok", " "]\n', "examples must be a list"),
        ("desk", HEAD + ALPHA + "examples = [1]\n", "examples must be a list"),
        ("desk", HEAD + ALPHA + f"examples = {json.dumps(['q'] * 65)}\n", "at most 64"),
        ("desk", HEAD + ALPHA + 'speed = "fast"\n', "takes model, description and examples"),
        ("desk", HEAD + ALPHA.replace('description = "a"\n', ""), "description must be"),
        ("desk", HEAD.replace('referral = "ask"\n', "") + ALPHA, "referral must be"),
        ("desk", HEAD + 'roles = "line"\n' + ALPHA, "roles must be a list"),
        ("desk", "embedding = \n", "Invalid"),
        ("Desk", HEAD + ALPHA, "file name must match"),
        ("-desk", HEAD + ALPHA, "file name must match"),
    ],
    ids=[
        "unknown-key",
        "no-specialists",
        "empty-specialists",
        "duplicate-specialist",
        "generalist-is-specialist",
        "examples-not-list",
        "blank-example",
        "example-not-string",
        "too-many-examples",
        "unknown-specialist-key",
        "no-description",
        "no-referral",
        "roles-not-list",
        "bad-toml",
        "upper-case-name",
        "leading-dash-name",
    ],
)
def test_a_bad_route_is_refused_naming_file_and_problem(
    tmp_path: Path, name: str, text: str, problem: str
) -> None:
    path = write_route(tmp_path, name, text)
    with pytest.raises(RouteError) as caught:
        read_route(path)
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)


def calibration(similarity: float = 0.65, config_sha256: str = "") -> Calibration:
    return Calibration(
        similarity=similarity,
        specialist_confidence=0.8,
        generalist_confidence=NEVER,
        suite="/suites/desk.jsonl",
        suite_sha256="ab" * 32,
        target_error=0.1,
        calibrated_at="2024-01-01T00:00:00+00:00",
        measured={"cases": 6, "refers_everything": False},
        config_sha256=config_sha256,
    )


def test_a_calibration_round_trips_beside_its_route(tmp_path: Path) -> None:
    route = read_route(write_route(tmp_path, "desk", route_toml()))
    assert calibration_path(route.path) == tmp_path / "desk.calibration.json"
    written = write_calibration(route, calibration(config_sha256=route.sha256))
    assert written == tmp_path / "desk.calibration.json"
    assert read_route(route.path).calibration == calibration(config_sha256=route.sha256)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["desk.calibration.json", "desk.toml"]


def test_a_broken_calibration_is_refused(tmp_path: Path) -> None:
    path = write_route(tmp_path, "desk", route_toml())
    calibration_path(path).write_text('{"similarity": 0.5}')
    with pytest.raises(RouteError, match="not a calibration this appliance wrote"):
        read_route(path)


def test_a_calibration_without_a_temperature_was_greedy_and_a_bad_one_is_refused(
    tmp_path: Path,
) -> None:
    """Files written before the temperature was recorded were measured greedy (0); a
    temperature that is not a number >= 0 is refused, naming the file."""
    route = read_route(write_route(tmp_path, "desk", route_toml()))
    write_calibration(route, calibration(config_sha256=route.sha256))
    path = calibration_path(route.path)
    data = json.loads(path.read_text())
    del data["temperature"]
    path.write_text(json.dumps(data))
    read = read_route(route.path).calibration
    assert read is not None and read.temperature == 0.0
    for bad in (None, -0.5, "0", True):
        path.write_text(json.dumps({**data, "temperature": bad}))
        with pytest.raises(RouteError, match=r"temperature must be a number >= 0") as caught:
            read_route(route.path)
        assert str(path) in str(caught.value)


def test_route_table_reads_again_when_a_file_changes(tmp_path: Path) -> None:
    table = RouteTable(tmp_path)
    assert table.routes() == {}
    path = write_route(tmp_path, "desk", route_toml())
    first = table.get("desk")
    assert first is not None and first.generalist == "gen"
    assert first.calibration is None
    path.write_text(route_toml(generalist="gemma-3-270m"))
    second = table.get("desk")
    assert second is not None and second.generalist == "gemma-3-270m"
    write_calibration(second, calibration(0.42, second.sha256))
    third = table.get("desk")
    assert third is not None and third.calibration is not None
    assert third.calibration.similarity == 0.42
    # Edited after its calibration: the thresholds were measured for another config.
    path.write_text(route_toml(generalist="smollm2-135m-instruct"))
    fourth = table.get("desk")
    assert fourth is not None and fourth.calibration is None and fourth.stale_calibration


def test_a_route_may_not_take_a_models_name(tmp_path: Path) -> None:
    write_route(tmp_path, "desk", route_toml())
    write_route(tmp_path, "gen", route_toml(generalist="other"))
    table = RouteTable(tmp_path, taken=lambda name: name == "gen")
    assert sorted(table.routes()) == ["desk"]
    assert "is a model's name" in table.problems["gen"]


def test_route_table_reports_a_broken_route_and_serves_the_rest(tmp_path: Path) -> None:
    write_route(tmp_path, "desk", route_toml())
    broken = write_route(tmp_path, "yard", HEAD + 'colour = "red"\n' + ALPHA)
    table = RouteTable(tmp_path)
    assert sorted(table.routes()) == ["desk"]
    assert table.get("yard") is None
    assert set(table.problems) == {"yard"}
    assert str(broken) in table.problems["yard"]
    assert "unknown keys colour" in table.problems["yard"]
    broken.write_text(HEAD + ALPHA)  # fixed: served, and no longer a problem
    assert sorted(table.routes()) == ["desk", "yard"]
    assert table.problems == {}


# --- router -----------------------------------------------------------------------


def test_confidence_is_the_geometric_mean_of_probabilities() -> None:
    # sqrt(0.5 * 0.125) = sqrt(1/16) = 0.25
    assert confidence([math.log(0.5), math.log(0.125)]) == pytest.approx(0.25)
    assert confidence([0.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert confidence([math.log(0.2)]) == pytest.approx(0.2)
    assert confidence([]) == 0.0


def test_question_is_the_last_non_empty_user_message() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "second"},
        {"role": "user", "content": "   "},
        {"role": "assistant", "content": "later"},
    ]
    assert question_of(messages) == "second"


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "system", "content": "be brief"}, {"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": " \n"}],
        [{"role": "user"}],
    ],
)
def test_no_user_message_is_invalid(messages: list[dict[str, str]]) -> None:
    with pytest.raises(Invalid) as caught:
        question_of(messages)
    assert caught.value.param == "messages"


# --- the promotion gate -----------------------------------------------------------

SUITE = {"name": "desk", "threshold": 0.7, "margin": 0.05}


def entry(
    model: str, score: float, groups: dict[str, float] | None = None, errors: int = 0
) -> dict[str, Any]:
    area = {value: {"score": s} for value, s in (groups or {}).items()}
    return {"model": model, "score": score, "cases": 10, "errors": errors, "tags": {"area": area}}


def test_gate_passes_an_equal_or_better_candidate() -> None:
    champion = entry("v1", 0.8, {"a": 0.8, "b": 0.8})
    assert judge(SUITE, entry("v2", 0.8, {"a": 0.8, "b": 0.8}), champion) == []
    assert judge(SUITE, entry("v2", 0.9, {"a": 0.9, "b": 0.85}), champion) == []


def test_gate_refuses_below_the_threshold_with_both_numbers() -> None:
    (problem,) = judge(SUITE, entry("v2", 0.6), entry("v1", 0.6))
    assert "0.600" in problem and "0.700" in problem


def test_gate_refuses_worse_than_the_champion_beyond_the_margin() -> None:
    (problem,) = judge(SUITE, entry("v2", 0.8), entry("v1", 0.9))  # 0.8 < 0.9 - 0.05
    assert "0.800" in problem and "0.900" in problem and "v1" in problem


def test_gate_passes_worse_within_the_margin() -> None:
    champion = entry("v1", 0.83, {"a": 0.83})
    assert judge(SUITE, entry("v2", 0.8, {"a": 0.79}), champion) == []  # 0.04 worse


def test_gate_refuses_a_group_worse_beyond_the_margin_while_equal_overall() -> None:
    champion = entry("v1", 0.8, {"a": 0.8, "b": 0.8})
    (problem,) = judge(SUITE, entry("v2", 0.8, {"a": 1.0, "b": 0.6, "c": 0.1}), champion)
    assert "area=b" in problem
    assert "0.600" in problem and "0.800" in problem


def test_gate_without_champion_weighs_only_the_threshold() -> None:
    assert judge(SUITE, entry("v2", 0.75, {"a": 0.1}), None) == []
    (problem,) = judge(SUITE, entry("v2", 0.65), None)
    assert "0.650" in problem and "0.700" in problem
    assert judge({"name": "free"}, entry("v2", 0.1), None) == []


def test_gate_refuses_errors() -> None:
    (problem,) = judge(SUITE, entry("v2", 0.9, errors=2), entry("v1", 0.8))
    assert "failed 2 of 10" in problem


# --- served names -----------------------------------------------------------------


def test_promote_resolve_and_roll_back(tmp_path: Path) -> None:
    table = AliasTable(tmp_path / "aliases.json")
    assert table.resolve("triage") == "triage"
    assert table.promote("triage", "triage-v1", {"run": "r1"}) is None
    assert table.resolve("triage") == "triage-v1"
    assert table.promote("triage", "triage-v2", {"run": "r2"}) == "triage-v1"
    assert table.resolve("triage") == "triage-v2"
    assert table.resolve("other") == "other"
    entry = table.all()["triage"]
    assert entry["evidence"] == {"run": "r2"}
    assert [h["champion"] for h in entry["history"]] == ["triage-v1"]
    assert entry["history"][0]["evidence"] == {"run": "r1"}
    assert table.rollback("triage") == ("triage-v2", "triage-v1")
    assert table.resolve("triage") == "triage-v1"
    assert table.all()["triage"]["history"] == []
    assert table.all()["triage"]["rolled_back_from"] == "triage-v2"
    with pytest.raises(AliasError, match="no other champion"):
        table.rollback("triage")
    with pytest.raises(AliasError, match="not a served name"):
        table.rollback("other")


@pytest.mark.parametrize("name", ["Triage", "-triage", "tri age", "", "x" * 65])
def test_a_bad_served_name_is_refused(tmp_path: Path, name: str) -> None:
    table = AliasTable(tmp_path / "aliases.json")
    with pytest.raises(AliasError):
        table.promote(name, "triage-v1", {})
    assert not table.path.exists()


def test_another_table_on_the_same_file_sees_changes(tmp_path: Path) -> None:
    cli, server = AliasTable(tmp_path / "aliases.json"), AliasTable(tmp_path / "aliases.json")
    assert server.resolve("triage") == "triage"
    cli.promote("triage", "triage-v1", {})
    assert server.resolve("triage") == "triage-v1"
    cli.promote("triage", "triage-v2", {})
    assert server.resolve("triage") == "triage-v2"
    cli.rollback("triage")
    assert server.resolve("triage") == "triage-v1"


# --- saved eval runs --------------------------------------------------------------


def test_finite_turns_nan_and_inf_into_none_throughout() -> None:
    value = {
        "a": math.nan,
        "b": [1.5, math.inf, {"c": -math.inf, "d": 0.25}],
        "e": (2, math.nan),
        "f": "nan",
        "g": None,
        "h": 3,
    }
    assert finite(value) == {
        "a": None,
        "b": [1.5, None, {"c": None, "d": 0.25}],
        "e": [2, None],
        "f": "nan",
        "g": None,
        "h": 3,
    }
    json.dumps(finite(value), allow_nan=False)  # valid JSON
    assert finite(math.nan) is None
    assert finite(0.5) == 0.5


def model_entry(model: str, sha: str, score: float) -> dict[str, Any]:
    return {
        "model": model,
        "sha256": sha,
        "served_by": None,
        "metric": "accuracy",
        "score": score,
        "ci95": [score - 0.1, score + 0.1],
        "cases": 4,
        "errors": 0,
        "passed": 3,
        "tags": {"area": {"a": {"score": 1.0, "cases": 2}, "b": {"score": 0.5, "cases": 2}}},
        "latency_ms": {"p50": 10.0},
        "results": [{"id": "c1", "passed": True}],
    }


def report(run_id: str, suite_sha: str, finished: str, *models: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "suite": {"name": "desk", "sha256": suite_sha, "cases": 4},
        "started": finished,
        "finished": finished,
        "models": list(models),
    }


def test_audit_summary_carries_hashes_and_scores_only(tmp_path: Path) -> None:
    r = report("run1", "s" * 64, "2024-01-01T00:00:00+00:00", model_entry("m", "a" * 64, 0.75))
    summary = audit_summary(r, "f" * 64, tmp_path / "run1")
    assert summary == {
        "run_id": "run1",
        "suite": {"name": "desk", "sha256": "s" * 64, "cases": 4},
        "report": {"path": str(tmp_path / "run1"), "sha256": "f" * 64},
        "models": [
            {
                "model": "m",
                "sha256": "a" * 64,
                "served_by": None,
                "metric": "accuracy",
                "score": 0.75,
                "ci95": [0.65, 0.85],
                "cases": 4,
                "errors": 0,
                "tags": {"area": {"a": 1.0, "b": 0.5}},
            }
        ],
    }


def save_by_hand(directory: Path, r: dict[str, Any]) -> None:
    out = directory / r["run_id"]
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps(r))


def test_latest_picks_the_newest_run_with_the_same_hashes(tmp_path: Path) -> None:
    suite, other_suite, sha, other_sha = "s" * 64, "t" * 64, "a" * 64, "b" * 64
    runs = [
        report("r1", suite, "2024-01-01T00:00:00+00:00", model_entry("m", sha, 0.5)),
        report(
            "r2",
            suite,
            "2024-03-01T00:00:00+00:00",
            model_entry("x", sha, 0.1),
            model_entry("m", sha, 0.7),
        ),
        report("r0", suite, "2023-12-01T00:00:00+00:00", model_entry("m", sha, 0.3)),
        report("r3", other_suite, "2024-06-01T00:00:00+00:00", model_entry("m", sha, 0.9)),
        report("r4", suite, "2024-07-01T00:00:00+00:00", model_entry("m", other_sha, 0.95)),
        report("r5", suite, "2024-08-01T00:00:00+00:00", model_entry("n", sha, 0.99)),
    ]
    for r in runs:
        save_by_hand(tmp_path, r)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text("{not json")
    found = latest(tmp_path, suite, "m", sha)
    assert found is not None and found["score"] == 0.7
    assert latest(tmp_path, other_suite, "m", sha) == model_entry("m", sha, 0.9)
    assert latest(tmp_path, suite, "m", "c" * 64) is None
    assert latest(tmp_path / "nothing-here", suite, "m", sha) is None


def test_route_files_are_written_atomically(tmp_path: Path) -> None:
    route = read_route(write_route(tmp_path, "desk", route_toml()))
    write_calibration(route, calibration(config_sha256=route.sha256))
    write_calibration(route, calibration(0.5, route.sha256))
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
    assert read_route(route.path).calibration == calibration(0.5, route.sha256)
