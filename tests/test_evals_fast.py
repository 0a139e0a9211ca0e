"""Eval suites' pure logic: graders on hand-written answers, the statistics against
hand-computed values, suites loaded from real files in a temp dir (and each way one
can be wrong), the run summary and the HTML report. No model, no server: seconds."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest

from appliance.evals import (
    Grader,
    SuiteError,
    accuracy,
    auc,
    bootstrap_ci,
    f1,
    grade,
    load_suite,
    parse_grader,
    percentile,
    render_html,
    summarize_text,
    tags_of,
    wilson,
)
from appliance.evals.graders import check_expected, first_number, normalize
from appliance.evals.report import _nice_axis

# --- graders ----------------------------------------------------------------------


def passes(spec: Any, answer: str, expected: Any) -> bool:
    grader = parse_grader(spec, "test")
    check_expected(grader, expected, "test")
    return grade(grader, answer, expected).passed


def test_exact_strips_whitespace_only() -> None:
    assert passes("exact", "  Paris\n", "Paris")
    assert passes("exact", "12", 12)
    assert not passes("exact", "paris", "Paris")
    assert grade(Grader("exact"), "Lyon", "Paris").detail == "expected 'Paris', got 'Lyon'"


def test_normalized_ignores_case_and_punctuation() -> None:
    assert normalize("  The Answer: B!  ") == "the answer b"
    assert normalize("ÉTÉ—été") == "été été"
    assert passes("normalized", "PARIS.", "paris")
    assert passes("normalized", "New-York!", ["Boston", "new york"])
    assert not passes("normalized", "Paris, France", "Paris")


def test_contains_matches_whole_words() -> None:
    assert passes("contains", "Likely: acute Appendicitis.", "appendicitis")
    assert passes("contains", "It is sepsis", ["pneumonia", "SEPSIS"])
    assert not passes("contains", "I know the answer", "no")
    assert not passes("contains", "pneumonia", "sepsis")


def test_regex_searches_with_flags() -> None:
    assert passes({"type": "regex", "flags": "i"}, "Result: POSITIVE", r"\bpositive\b")
    assert not passes("regex", "Result: POSITIVE", r"\bpositive\b")
    verdict = grade(Grader("regex"), "no", r"^\d+$")
    assert not verdict.passed and "does not match" in verdict.detail


def test_bad_regex_is_refused_before_grading() -> None:
    with pytest.raises(SuiteError, match=r"where: bad regex"):
        check_expected(Grader("regex"), "([a-z", "where")
    with pytest.raises(SuiteError, match="flags"):
        parse_grader({"type": "regex", "flags": "x"}, "where")


@pytest.mark.parametrize(
    ("answer", "expected", "ok"),
    [
        ("B", "B", True),
        ("(C)", "C", True),
        ("C.", "c", True),
        ("Answer: B", "B", True),
        ("The answer is (D) because", "D", True),
        ("A", "B", False),
        ("answer: b", "B", False),  # lower-case letters are words, not choices
        ("a patient needs B", "B", True),
        ("I cannot tell", "B", False),
    ],
)
def test_choice_takes_the_first_standalone_letter(answer: str, expected: str, ok: bool) -> None:
    assert passes("choice", answer, expected) is ok


def test_choice_with_options() -> None:
    spec = {"type": "choice", "choices": ["aspirin", "heparin", "warfarin"]}
    # With options known, "I" is not a choice letter.
    assert passes(spec, "I think B", "B")
    assert passes(spec, "B", "Heparin")  # expected as the option's text
    assert passes(spec, "heparin", "B")  # answer as the option's text
    assert not passes(spec, "A", "heparin")
    with pytest.raises(SuiteError, match="not one of the choices"):
        check_expected(parse_grader(spec, "x"), "E", "x")
    assert passes("choice", "Warfarin.", "warfarin")  # no options: normalized text


def test_json_fields_fence_and_schema() -> None:
    schema = {
        "type": "object",
        "required": ["triage"],
        "properties": {
            "triage": {"type": "integer", "minimum": 1, "maximum": 5},
            "notes": {"type": "array", "items": {"type": "string"}},
        },
    }
    spec = {"type": "json", "schema": schema}
    fenced = '```json\n{"triage": 2, "vitals": {"hr": 110}, "notes": ["a"]}\n```'
    assert passes(spec, fenced, {"triage": 2, "vitals.hr": 110, "notes.0": "a"})
    assert passes("json", ' {"a": 1.0} ', {"a": 1})
    failed = grade(parse_grader(spec, "x"), '{"triage": 7}', {})
    assert not failed.passed and failed.detail == "schema: $.triage should be <= 5"
    failed = grade(parse_grader(spec, "x"), '{"triage": 2, "notes": [3]}', {})
    assert failed.detail == "schema: $.notes[0] should be string"
    assert not passes("json", '{"a": {"b": 2}}', {"a.b": 3})
    assert grade(Grader("json"), '{"a": 1}', {"a.b": 1}).detail == "no field 'a.b'"
    assert not passes("json", '{"ok": 1}', {"ok": True})  # true is not 1
    assert "not JSON" in grade(Grader("json"), "Sure! {", {}).detail


def test_json_schema_keywords_are_checked_at_load() -> None:
    with pytest.raises(SuiteError, match="unsupported keyword 'oneOf'"):
        parse_grader({"type": "json", "schema": {"oneOf": []}}, "x")
    with pytest.raises(SuiteError, match="minimum must be a number"):
        parse_grader({"type": "json", "schema": {"minimum": "1"}}, "x")


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("about 1,200 mg", 1200.0),
        ("-3.5 degrees", -3.5),
        ("1e3", 1000.0),
        ("COVID-19", 19.0),
        ("3,4 and 5", 3.0),
        ("−2", -2.0),
        ("none", None),
    ],
)
def test_first_number(text: str, number: float | None) -> None:
    assert first_number(text) == number


def test_numeric_tolerance_and_detail() -> None:
    spec = {"type": "numeric", "tolerance": 0.5}
    assert passes(spec, "about 12.4", 12)
    assert passes(spec, "11.5", 12)
    assert grade(parse_grader(spec, "x"), "14 units", 12).detail == "expected 12 ± 0.5, got 14"
    assert passes("numeric", "Total: 1,200", 1200)
    assert not passes("numeric", "1201", 1200)
    assert passes({"type": "numeric", "relative": 0.1}, "108", 100)
    assert not passes({"type": "numeric", "relative": 0.1}, "111", 100)
    assert grade(Grader("numeric"), "I don't know", 3).detail == "no number in the answer"
    with pytest.raises(SuiteError, match="tolerance must be a number >= 0"):
        parse_grader({"type": "numeric", "tolerance": -1}, "x")


def test_grader_specs_are_checked() -> None:
    with pytest.raises(SuiteError, match="here: unknown grader type 'fuzzy'"):
        parse_grader("fuzzy", "here")
    with pytest.raises(SuiteError, match="has no parameter 'tolerance'"):
        parse_grader({"type": "exact", "tolerance": 1}, "here")
    with pytest.raises(SuiteError, match='needs "expected" as a number'):
        check_expected(Grader("numeric"), "twelve", "here")


@pytest.mark.parametrize("kind", ["exact", "normalized", "contains", "choice", "numeric", "json"])
def test_grading_never_raises_on_model_output(kind: str) -> None:
    expected: Any = {"json": {"a": 1}, "numeric": 1}.get(kind, "a")
    for answer in ["", "\x00", "[" * 100_000, "9" * 5000, "1e999", '{"a": NaN}', "```json\n```"]:
        assert isinstance(grade(Grader(kind), answer, expected).passed, bool)
    deep = "[" * 100_000 + "]" * 100_000
    assert grade(Grader("json"), deep, {}).detail.startswith("answer is not JSON")


# --- statistics -------------------------------------------------------------------


def test_wilson_against_hand_values() -> None:
    low, high = wilson(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    low, high = wilson(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)
    assert math.isnan(percentile([], 50))


def test_accuracy_f1_auc_by_hand() -> None:
    labels = [1, 1, 1, 1, 0, 0]
    predicted = [1, 1, 0, 0, 1, 0]
    assert accuracy(labels, predicted) == 0.5
    assert f1(labels, predicted) == pytest.approx(4 / 7)  # tp 2, fp 1, fn 2
    assert f1(labels, predicted, positive=0) == pytest.approx(0.4)  # tp 1, fp 2, fn 1
    assert math.isnan(f1([0, 0], [0, 0]))
    # Pairs (pos, neg): (.8,.8) ties = 0.5, (.8,.2) = 1, (.6,.8) = 0, (.6,.2) = 1.
    assert auc([1, 0, 1, 0], [0.8, 0.8, 0.6, 0.2]) == pytest.approx(2.5 / 4)
    assert auc([2, 0, 2], [0.9, 0.1, 0.5], positive=2) == 1.0
    assert math.isnan(auc([1, 1], [0.2, 0.3]))


def test_bootstrap_is_deterministic_and_brackets_the_score() -> None:
    labels = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1] * 3
    scores = [0.9, 0.2, 0.7, 0.4, 0.5, 0.8, 0.1, 0.6, 0.3, 0.95] * 3
    first = bootstrap_ci(auc, labels, scores, rounds=300, seed=7)
    assert first == bootstrap_ci(auc, labels, scores, rounds=300, seed=7)
    assert first != bootstrap_ci(auc, labels, scores, rounds=300, seed=8)
    assert 0.0 <= first[0] < auc(labels, scores) < first[1] <= 1.0
    assert all(math.isnan(v) for v in bootstrap_ci(auc, [1, 1], [0.1, 0.2], rounds=20))


# --- suites -----------------------------------------------------------------------


def write_jsonl(path: Path, *objects: Any) -> Path:
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objects))
    return path


def test_jsonl_suite_with_header(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "triage.jsonl",
        {"suite": {"threshold": 0.8, "margin": 0.02, "system": "Be brief.", "grader": "choice"}},
        {"prompt": "Pick one", "expected": "B", "tags": {"ward": "A"}},
        "",
        {
            "id": "own-system",
            "messages": [
                {"role": "system", "content": "Mine."},
                {"role": "user", "content": "How many?"},
            ],
            "expected": 12,
            "grader": {"type": "numeric", "tolerance": 1},
            "tags": {"ward": "B", "shift": "night"},
        },
        {"prompt": "Again", "expected": "C", "tags": {"ward": "A"}},
    )
    suite = load_suite(path)
    assert (suite.name, suite.kind, suite.settings.threshold, suite.settings.margin) == (
        "triage",
        "text",
        0.8,
        0.02,
    )
    assert suite.settings.max_tokens == 64 and suite.settings.temperature == 0.0
    first, second, third = suite.cases
    assert first.id == "case-1" and first.line == 2 and first.grader == Grader("choice")
    assert first.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Pick one"},
    ]
    assert second.messages[0] == {"role": "system", "content": "Mine."}
    assert len(second.messages) == 2 and second.grader.params == {"tolerance": 1}
    assert third.id == "case-3" and third.line == 5
    assert tags_of(suite.cases) == {"shift": ["night"], "ward": ["A", "B"]}
    assert suite.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def make_dir_suite(root: Path, toml: str, cases: str, name: str = "cases.jsonl") -> Path:
    root.mkdir(exist_ok=True)
    (root / "suite.toml").write_text(toml)
    (root / name).write_text(cases)
    return root


def test_directory_suite_and_its_fingerprint(tmp_path: Path) -> None:
    cases = '{"prompt": "2+2?", "expected": 4}\n{"prompt": "3+3?", "expected": 6}\n'
    root = make_dir_suite(
        tmp_path / "arith", 'description = "sums"\ngrader = { type = "numeric" }\n', cases
    )
    suite = load_suite(root)
    assert suite.name == "arith" and suite.settings.description == "sums"
    assert [c.expected for c in suite.cases] == [4, 6]
    assert suite.cases[0].grader == Grader("numeric")
    before = suite.sha256

    os.utime(root / "cases.jsonl", (1, 1))
    assert load_suite(root).sha256 == before
    (root / "cases.jsonl").write_text(cases.replace("6", "7"))
    changed = load_suite(root).sha256
    assert changed != before
    (root / "README").write_text("notes")
    assert load_suite(root).sha256 not in (before, changed)


def test_tensor_suite_from_csv(tmp_path: Path) -> None:
    csv_text = "id,age,hr,label,tag:ward\np1,70,110,1,A\np2,30,70,0,B\n\np3,55,95.5,1,\n"
    toml = 'input = "x"\noutput = "prob"\nmetric = "auc"\nthreshold = 0.75\n'
    suite = load_suite(make_dir_suite(tmp_path / "sepsis", toml, csv_text, "cases.csv"))
    assert suite.kind == "tensor" and suite.cases == []
    assert suite.settings.features == ["age", "hr"]
    assert (suite.settings.input, suite.settings.output, suite.settings.metric) == (
        "x",
        "prob",
        "auc",
    )
    p1, p2, p3 = suite.tensor_cases
    assert (p1.id, p1.features, p1.label, p1.tags, p1.line) == (
        "p1",
        [70.0, 110.0],
        1,
        {"ward": "A"},
        2,
    )
    assert p2.label == 0 and p3.tags == {} and p3.line == 5
    assert tags_of(suite.tensor_cases) == {"ward": ["A", "B"]}

    toml2 = 'input = "x"\noutput = "y"\nfeatures = ["hr", "age"]\nlabel = "y"\n'
    csv2 = "age,hr,y\n40,80,0\n"
    case = load_suite(make_dir_suite(tmp_path / "two", toml2, csv2, "cases.csv")).tensor_cases[0]
    assert case.features == [80.0, 40.0] and case.id == "case-1"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a"}'], 'line 1: case needs "expected"'),
        (['{"prompt": "a", "expected": 1}', "{bad"], "line 2: bad JSON"),
        (['{"prompt": "a", "expected": 1, "weight": 2}'], "line 1: unknown case key 'weight'"),
        (['{"expected": 1}'], 'line 1: case needs exactly one of "messages" and "prompt"'),
        (
            ['{"prompt": "a", "messages": [{"role": "user", "content": "a"}], "expected": 1}'],
            "line 1: case needs exactly one",
        ),
        (
            [
                '{"id": "x", "prompt": "a", "expected": 1}',
                "",
                '{"id": "x", "prompt": "b", "expected": 1}',
            ],
            "line 3: id 'x' already used on line 1",
        ),
        (['{"prompt": "a", "expected": 1, "grader": "fuzzy"}'], "line 1: unknown grader type"),
        (['{"prompt": "a", "expected": "(", "grader": "regex"}'], "line 1: bad regex"),
        (['{"suite": {"threshold": 1.5}}', '{"prompt": "a", "expected": 1}'], "line 1: threshold"),
        (['{"suite": {"colour": "red"}}'], "line 1: unknown setting 'colour'"),
        (['{"suite": {"input": "x"}}'], "setting 'input' is not for a text suite"),
        (['{"suite": {}}', ""], "the suite has no cases"),
        (['{"prompt": "a", "expected": 1}', '{"suite": {}}'], "line 2: unknown case key 'suite'"),
        (["[1, 2]"], "line 1: expected a JSON object"),
        (['{"prompt": "a", "expected": 1, "expected": 2}'], "line 1: bad JSON: key 'expected'"),
        (['{"messages": [{"role": "robot", "content": "a"}], "expected": 1}'], "messages[0]"),
        (['{"prompt": "a", "expected": 1, "tags": {"ward": 3}}'], "line 1: tags must be"),
    ],
)
def test_suite_errors_name_the_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(SuiteError) as raised:
        load_suite(path)
    assert str(raised.value).startswith(str(path))
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("toml", "name", "cases", "message"),
    [
        ('input = "x"\n', "cases.csv", "a,label\n1,0\n", "needs 'output'"),
        (
            'input = "x"\noutput = "y"\n',
            "cases.csv",
            "a,b\n1,0\n",
            "line 1: no label column 'label'",
        ),
        (
            'input = "x"\noutput = "y"\n',
            "cases.csv",
            "a,label\n1,0\nhigh,1\n",
            "line 3: feature 'a'",
        ),
        ('input = "x"\noutput = "y"\n', "cases.csv", "a,label\n1,yes\n", "line 2: label 'yes'"),
        ('input = "x"\noutput = "y"\nmetric = "mse"\n', "cases.csv", "a,label\n1,0\n", "metric"),
        ("threshold = -0.1\n", "cases.jsonl", '{"prompt": "a", "expected": 1}', "threshold"),
        ("max_tokens = 0\n", "cases.jsonl", '{"prompt": "a", "expected": 1}', "max_tokens"),
        ("name = [\n", "cases.jsonl", '{"prompt": "a", "expected": 1}', "suite.toml: "),
        ('kind = "tensor"\n', "cases.jsonl", '{"prompt": "a", "expected": 1}', "needs a directory"),
    ],
)
def test_directory_suite_errors(
    tmp_path: Path, toml: str, name: str, cases: str, message: str
) -> None:
    with pytest.raises(SuiteError, match=re.escape(message)):
        load_suite(make_dir_suite(tmp_path / "s", toml, cases, name))


def test_unreadable_or_ambiguous_paths(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="cannot read"):
        load_suite(tmp_path / "missing.jsonl")
    root = make_dir_suite(tmp_path / "both", "", '{"prompt": "a", "expected": 1}')
    (root / "cases.csv").write_text("a,label\n1,0\n")
    with pytest.raises(SuiteError, match="it has both"):
        load_suite(root)


# --- summary and report -----------------------------------------------------------


def test_summarize_text_by_hand() -> None:
    results: list[dict[str, Any]] = [
        {"passed": True, "latency_ms": 100, "tags": {"ward": "A"}, "completion_tokens": 10,
         "decode_seconds": 0.5},
        {"passed": False, "latency_ms": 200, "tags": {"ward": "A"}, "completion_tokens": 20,
         "decode_seconds": 0.5},
        {"passed": True, "latency_ms": 300, "tags": {"ward": "B"}, "completion_tokens": 30,
         "decode_seconds": 1.0},
        {"passed": False, "latency_ms": None, "tags": {"ward": "B"}, "error": "timeout"},
    ]  # fmt: skip
    summary = summarize_text(results)
    assert summary["metric"] == "pass rate"
    assert (summary["score"], summary["passed"], summary["cases"], summary["errors"]) == (
        0.5,
        2,
        4,
        1,
    )
    # Wilson 2/4: center 0.5, half 1.959964·sqrt(1/16 + z²/64) / (1 + z²/4) = 0.35.
    assert [round(v, 4) for v in summary["ci95"]] == [0.15, 0.85]
    assert summary["latency_ms"] == {"p50": 200.0, "p95": pytest.approx(290.0), "mean": 200.0}
    assert summary["tokens_per_second"] == 30.0  # 60 tokens over 2 s
    ward_a = summary["tags"]["ward"]["A"]
    assert (ward_a["score"], ward_a["cases"], ward_a["ci95"]) == (0.5, 2, list(wilson(1, 2)))
    assert list(summary["tags"]["ward"]) == ["A", "B"]

    # An error is a failure whatever the grader said.
    assert summarize_text([{"passed": True, "error": "timeout", "latency_ms": None}])["passed"] == 0

    empty = summarize_text([])
    assert empty["score"] == 0.0 and empty["ci95"] == [0.0, 1.0]
    assert empty["latency_ms"]["p50"] is None and empty["tokens_per_second"] is None
    json.dumps(empty, allow_nan=False)


def model(name: str, score: float, p50: float, answer: str = "B") -> dict[str, Any]:
    return {
        "model": name,
        "sha256": "ab" * 32,
        "served_by": None,
        "metric": "pass rate",
        "score": score,
        "ci95": [score - 0.1, score + 0.1],
        "passed": 1,
        "cases": 2,
        "tags": {"ward": {"A": {"score": score, "ci95": [0.1, 0.9], "cases": 2}}},
        "latency_ms": {"p50": p50, "p95": p50 * 2, "mean": p50},
        "tokens_per_second": 12.5,
        "peak_memory_mb": 300.0,
        "errors": 0,
        "results": [
            {"id": "c1", "passed": True, "answer": "A", "expected": "A", "detail": "",
             "latency_ms": p50, "tags": {"ward": "A"}},
            {"id": "c2", "passed": False, "answer": answer, "expected": "A",
             "detail": "expected A, got B", "latency_ms": p50, "tags": {"ward": "A"}},
        ],
    }  # fmt: skip


def report(threshold: float | None, *models: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": "run-1",
        "suite": {"name": "triage <v2>", "sha256": "cd" * 32, "path": "/s", "cases": 2,
                  "threshold": threshold, "margin": 0.02},
        "started": "2025-01-01T00:00:00Z",
        "finished": "2025-01-01T00:01:00Z",
        "models": list(models),
    }  # fmt: skip


def test_render_html_escapes_and_plots_each_model() -> None:
    page = render_html(
        report(
            0.8,
            model("small", 0.5, 120.0, answer="<script>alert(1)</script>"),
            model("large<b>", 0.9, 430.0),
        )
    )
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "large&lt;b&gt;" in page and "<b>" not in page
    assert "<title>Eval: triage &lt;v2&gt;</title>" in page
    assert page.count('class="point"') == 2
    assert page.count('class="ci"') == 2
    assert page.count('class="threshold"') == 1 and 'stroke-dasharray="6 4"' in page
    assert page.count("<details>") == 2 and "1 failed" in page
    assert "cd" * 32 in page
    # The x axis ends at 500 ms (ticks of 100): small at 120 of 500 along the plot.
    assert ">500</text>" in page and ">600</text>" not in page
    svg = page[page.index("<svg") : page.index("</svg>")]
    assert "<title" in svg and "http" not in svg.replace("http://www.w3.org/2000/svg", "")
    points = re.findall(r'class="point" cx="([\d.]+)" cy="([\d.]+)"', page)
    plot_w, plot_h = 720 - 64 - 190, 400 - 24 - 56
    assert float(points[0][0]) == pytest.approx(64 + plot_w * 120 / 500, abs=0.05)
    assert float(points[1][1]) == pytest.approx(24 + plot_h * (1 - 0.9), abs=0.05)


def test_render_html_without_threshold_or_latency() -> None:
    no_latency = model("m", 0.5, 1.0)
    no_latency["latency_ms"] = {"p50": None, "p95": None, "mean": None}
    page = render_html(report(None, no_latency))
    assert 'class="threshold"' not in page and 'class="point"' not in page
    assert "Not plotted (no latency): m" in page


@pytest.mark.parametrize(
    ("top", "axis"),
    [(430.0, (500.0, 100.0)), (0.0, (1.0, 0.2)), (12.0, (12.5, 2.5)), (1000.0, (1000.0, 200.0))],
)
def test_nice_axis(top: float, axis: tuple[float, float]) -> None:
    assert _nice_axis(top) == pytest.approx(axis)


def test_a_route_is_evaluated_only_at_its_calibrated_temperature(tmp_path: Path) -> None:
    """A route refuses any other temperature, so a suite that asks one is refused before
    its first case (not scored 0 on 400s); a plain model takes any."""
    from appliance.evals.client import ApiFailure
    from appliance.evals.runner import _check_route_temperature

    warm = load_suite(
        write_jsonl(
            tmp_path / "warm.jsonl",
            {"suite": {"temperature": 0.7}},
            {"prompt": "Hi", "expected": "hi"},
        )
    )
    greedy = load_suite(write_jsonl(tmp_path / "greedy.jsonl", {"prompt": "Hi", "expected": "hi"}))
    route = {"route": {"calibration": {"temperature": 0.0}}}
    with pytest.raises(ApiFailure, match=r"calibrated at, 0; suite warm asks 0\.7"):
        _check_route_temperature(warm, "desk", route)
    _check_route_temperature(greedy, "desk", route)
    _check_route_temperature(warm, "plain", None)
    _check_route_temperature(warm, "desk", {"route": {"calibration": None}})  # refused anyway
