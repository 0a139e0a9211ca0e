"""Graders: how a model's answer to an eval case is judged against the case's
``expected`` value.

A grader is data (a type and its parameters), parsed and checked when the suite loads,
so that a typo in a suite fails before any model is run rather than scoring every case
as a failure. Grading itself never raises on model output: whatever the model writes,
the answer gets a :class:`Verdict` whose ``detail`` says why it failed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class SuiteError(ValueError):
    """A suite that cannot be used as written; the message names the file, the line
    when there is one, and what is wrong. Defined here rather than in suite.py because
    graders are parsed while a suite loads, and suite.py imports this module."""


@dataclass(frozen=True)
class Grader:
    """One way of judging answers: ``type`` is one of :data:`GRADER_TYPES`, ``params``
    its parameters (already checked). Not hashable: ``params`` is a dict."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    detail: str = ""


# Each type with the parameters it accepts.
GRADER_TYPES: dict[str, frozenset[str]] = {
    "exact": frozenset(),
    "normalized": frozenset(),
    "contains": frozenset(),
    "regex": frozenset({"flags"}),
    "choice": frozenset({"choices"}),
    "json": frozenset({"schema"}),
    "numeric": frozenset({"tolerance", "relative"}),
}

_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}

# Thousands separators only in groups of three ("1,200"; "3,4" is the number 3), and a
# sign only where it is not a hyphen inside a word ("COVID-19" is 19).
_NUMBER = re.compile(
    r"(?:(?<![\w.])[-+\u2212])?(?<![\d.])"
    r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?"
)
_LETTER = re.compile(r"\b([A-Z])\b")
_FENCE = re.compile(r"^```[A-Za-z]*[ \t]*\n(.*?)\n?```$", re.DOTALL)


def parse_grader(spec: Any, where: str) -> Grader:
    """A grader from a suite's spec: a type name (``"exact"``) or a table
    (``{"type": "numeric", "tolerance": 0.5}``). ``where`` prefixes error messages
    (e.g. ``"cases.jsonl line 4"``)."""
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        raise SuiteError(f"{where}: grader must be a type name or a table, not {spec!r}")
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in GRADER_TYPES:
        known = ", ".join(sorted(GRADER_TYPES))
        raise SuiteError(f"{where}: unknown grader type {kind!r} (known: {known})")
    params = {k: v for k, v in spec.items() if k != "type"}
    unknown = sorted(set(params) - GRADER_TYPES[kind])
    if unknown:
        raise SuiteError(f"{where}: grader {kind!r} has no parameter {unknown[0]!r}")
    _check_params(kind, params, where)
    return Grader(kind, params)


def _check_params(kind: str, params: dict[str, Any], where: str) -> None:
    if kind == "regex" and "flags" in params:
        flags = params["flags"]
        if not isinstance(flags, str) or set(flags) - set(_REGEX_FLAGS):
            raise SuiteError(f'{where}: regex flags must be letters from "ims", not {flags!r}')
    if kind == "choice" and "choices" in params:
        choices = params["choices"]
        if (
            not isinstance(choices, list)
            or not 1 <= len(choices) <= 26
            or not all(isinstance(c, str) for c in choices)
        ):
            raise SuiteError(f"{where}: choices must be a list of 1 to 26 strings")
    if kind == "numeric":
        for name in ("tolerance", "relative"):
            if name in params and not (_is_number(params[name]) and params[name] >= 0):
                raise SuiteError(f"{where}: {name} must be a number >= 0, not {params[name]!r}")
    if kind == "json" and "schema" in params:
        _check_schema(params["schema"], f"{where}: schema")


def check_expected(grader: Grader, expected: Any, where: str) -> None:
    """Raise :class:`SuiteError` when ``expected`` cannot be graded by ``grader``
    (a regex that does not compile, a numeric case without a number, ...)."""
    kind = grader.type
    if expected is None:
        raise SuiteError(f'{where}: "expected" must not be null')
    if kind in ("normalized", "contains"):
        if not _strings(expected):
            raise SuiteError(f'{where}: {kind} grader needs "expected" as a string or strings')
    elif kind == "regex":
        if not isinstance(expected, str):
            raise SuiteError(f'{where}: regex grader needs "expected" as a pattern string')
        try:
            re.compile(expected, _flags(grader))
        except re.error as e:
            raise SuiteError(f"{where}: bad regex {expected!r}: {e}") from None
    elif kind == "choice":
        if not isinstance(expected, str) or not expected.strip():
            raise SuiteError(f'{where}: choice grader needs "expected" as a letter or option')
        choices = grader.params.get("choices")
        if choices and not _among(expected.strip(), choices):
            raise SuiteError(f"{where}: expected {expected!r} is not one of the choices")
    elif kind == "json":
        if not isinstance(expected, dict) or not all(isinstance(k, str) for k in expected):
            raise SuiteError(f'{where}: json grader needs "expected" as a table of fields')
    elif kind == "numeric" and not _is_number(expected):
        raise SuiteError(f'{where}: numeric grader needs "expected" as a number')


def grade(grader: Grader, answer: str, expected: Any) -> Verdict:
    """Judge ``answer`` (the model's text) against ``expected``."""
    if not isinstance(answer, str):
        return Verdict(False, "no answer")
    try:
        return _grade(grader, answer, expected)
    except RecursionError:
        return Verdict(False, "answer nested too deeply to grade")


def _grade(grader: Grader, answer: str, expected: Any) -> Verdict:
    kind = grader.type
    if kind == "exact":
        want = str(expected).strip()
        got = answer.strip()
        return _verdict(got == want, f"expected {want!r}, got {_clip(got)!r}")
    if kind == "normalized":
        wants = _alternatives(expected)
        got = normalize(answer)
        return _verdict(got in {normalize(w) for w in wants}, _expected_got(wants, answer))
    if kind == "contains":
        wants = _alternatives(expected)
        padded = f" {normalize(answer)} "
        # Pad with spaces so that "no" is found as a word, not inside "know".
        hit = any(f" {normalize(w)} " in padded for w in wants if normalize(w))
        return _verdict(hit, f"answer does not contain {_or(wants)}")
    if kind == "regex":
        try:
            hit = re.search(str(expected), answer, _flags(grader)) is not None
        except re.error as e:
            return Verdict(False, f"bad regex: {e}")
        return _verdict(hit, f"answer does not match /{expected}/")
    if kind == "choice":
        return _grade_choice(grader, answer, str(expected))
    if kind == "json":
        return _grade_json(grader, answer, expected)
    if kind == "numeric":
        return _grade_numeric(grader, answer, expected)
    return Verdict(False, f"unknown grader type {kind!r}")


def normalize(text: str) -> str:
    """Casefolded, each run of characters that are not letters or digits made one
    space, stripped: "The Answer: B!" -> "the answer b"."""
    return re.sub(r"[\W_]+", " ", text.casefold()).strip()


def first_number(text: str) -> float | None:
    """The first number written in ``text`` ("about 1,200 mg" -> 1200.0), or None."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    try:
        value = float(match.group().replace(",", "").replace("\u2212", "-"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _among(expected: str, choices: list[str]) -> bool:
    if len(expected) == 1 and expected.isalpha():
        return ord("A") <= ord(expected.upper()) < ord("A") + len(choices)
    return any(normalize(c) == normalize(expected) for c in choices)


def _grade_choice(grader: Grader, answer: str, expected: str) -> Verdict:
    choices: list[str] = grader.params.get("choices", [])
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    want = expected.strip()
    if len(want) != 1 or not want.isalpha():
        # Option text: the letter of that option when the options are known.
        matches = [i for i, c in enumerate(choices) if normalize(c) == normalize(want)]
        if not matches:
            got = normalize(answer)
            return _verdict(got == normalize(want), f"expected {want!r}, got {_clip(answer)!r}")
        want = letters[matches[0]]
    want = want.upper()
    chosen = _chosen_letter(answer, letters)
    if chosen is None:
        # An answer that writes out the option instead of its letter.
        by_text = [i for i, c in enumerate(choices) if normalize(c) == normalize(answer)]
        if by_text:
            chosen = letters[by_text[0]]
    if chosen is None:
        return Verdict(False, f"expected {want}, no choice letter in the answer")
    return _verdict(chosen == want, f"expected {want}, got {chosen}")


def _chosen_letter(answer: str, letters: list[str]) -> str | None:
    # With known options only their letters count, so "I think B" picks B, not I.
    for match in _LETTER.finditer(answer):
        if not letters or match.group(1) in letters:
            return match.group(1)
    return None


def _grade_json(grader: Grader, answer: str, expected: Any) -> Verdict:
    text = answer.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError) as e:
        return Verdict(False, f"answer is not JSON: {e}")
    schema = grader.params.get("schema")
    if schema is not None:
        problem = schema_problem(parsed, schema)
        if problem:
            return Verdict(False, f"schema: {problem}")
    for path, want in (expected or {}).items():
        found, got = _lookup(parsed, path)
        if not found:
            return Verdict(False, f"no field {path!r}")
        if not json_equal(got, want):
            return Verdict(False, f"{path}: expected {_dump(want)}, got {_dump(got)}")
    return Verdict(True)


def _lookup(value: Any, path: str) -> tuple[bool, Any]:
    """The field at a dotted path ("a.b", "items.0.name"); a key that itself holds a
    dot is found when the whole path is a key of the object."""
    if isinstance(value, dict) and path in value:
        return True, value[path]
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return False, None
    return True, value


def _grade_numeric(grader: Grader, answer: str, expected: Any) -> Verdict:
    got = first_number(answer)
    if got is None:
        return Verdict(False, "no number in the answer")
    want = float(expected)
    tolerance = float(grader.params.get("tolerance", 0))
    if "relative" in grader.params:
        tolerance = max(tolerance, float(grader.params["relative"]) * abs(want))
    ok = abs(got - want) <= tolerance
    return _verdict(ok, f"expected {_num(want)} ± {_num(tolerance)}, got {_num(got)}")


# A JSON-schema subset: enough to say what shape a structured answer must have,
# without a runtime dependency. Keywords outside it are refused when the suite loads,
# so a schema never silently checks less than it says.
_SCHEMA_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "enum", "const", "minimum", "maximum",
        "items", "additionalProperties", "minLength", "maxLength", "minItems",
        "maxItems", "pattern",
    }
)  # fmt: skip
_SCHEMA_NOTES = frozenset({"$schema", "$id", "title", "description", "default", "examples"})
_JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


def _check_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise SuiteError(f"{where} must be a table")
    unknown = sorted(set(schema) - _SCHEMA_KEYWORDS - _SCHEMA_NOTES)
    if unknown:
        raise SuiteError(f"{where}: unsupported keyword {unknown[0]!r}")
    types = schema.get("type", [])
    names = [types] if isinstance(types, str) else types
    if not isinstance(names, list) or not all(
        isinstance(t, str) and t in _JSON_TYPES for t in names
    ):
        raise SuiteError(f"{where}: unknown type {types!r}")
    for key in ("minimum", "maximum"):
        if key in schema and not _is_number(schema[key]):
            raise SuiteError(f"{where}: {key} must be a number")
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        value = schema.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SuiteError(f"{where}: {key} must be an integer >= 0")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SuiteError(f"{where}: required must be a list of names")
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise SuiteError(f"{where}: enum must be a list")
    if not isinstance(schema.get("additionalProperties", True), bool | dict):
        raise SuiteError(f"{where}: additionalProperties must be true, false or a schema")
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise SuiteError(f"{where}: properties must be a table")
    for name, sub in properties.items():
        _check_schema(sub, f"{where}.properties.{name}")
    if "items" in schema:
        _check_schema(schema["items"], f"{where}.items")
    if isinstance(schema.get("additionalProperties"), dict):
        _check_schema(schema["additionalProperties"], f"{where}.additionalProperties")
    if "pattern" in schema:
        try:
            re.compile(schema["pattern"])
        except (re.error, TypeError) as e:
            raise SuiteError(f"{where}: bad pattern: {e}") from None


def schema_problem(value: Any, schema: dict[str, Any], at: str = "$") -> str | None:
    """The first way ``value`` breaks ``schema`` (the subset above), or None."""
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, t) for t in allowed):
            return f"{at} should be {' or '.join(allowed)}"
    if "const" in schema and not json_equal(value, schema["const"]):
        return f"{at} should be {_dump(schema['const'])}"
    if "enum" in schema and not any(json_equal(value, e) for e in schema["enum"]):
        return f"{at} should be one of {_dump(schema['enum'])}"
    if _is_number(value):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{at} should be >= {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{at} should be <= {schema['maximum']}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return f"{at} is shorter than {schema['minLength']}"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{at} is longer than {schema['maxLength']}"
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            return f"{at} does not match /{schema['pattern']}/"
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            return f"{at} has fewer than {schema['minItems']} items"
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return f"{at} has more than {schema['maxItems']} items"
        if "items" in schema:
            for i, item in enumerate(value):
                problem = schema_problem(item, schema["items"], f"{at}[{i}]")
                if problem:
                    return problem
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                return f"{at} lacks {name!r}"
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in properties:
                problem = schema_problem(item, properties[name], f"{at}.{name}")
            elif extra is False:
                problem = f"{at} has no field {name!r}"
            elif isinstance(extra, dict):
                problem = schema_problem(item, extra, f"{at}.{name}")
            else:
                problem = None
            if problem:
                return problem
    return None


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "number": _is_number(value),
        "boolean": isinstance(value, bool),
        "null": value is None,
    }.get(name, False)


def json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON means it: true is not 1, but 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _strings(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) for v in value)
    return isinstance(value, str)


def _alternatives(expected: Any) -> list[str]:
    return [str(e) for e in expected] if isinstance(expected, list) else [str(expected)]


def _flags(grader: Grader) -> int:
    flags = 0
    for letter in grader.params.get("flags", ""):
        flags |= _REGEX_FLAGS[letter]
    return flags


def _verdict(passed: bool, why: str) -> Verdict:
    return Verdict(True) if passed else Verdict(False, why)


def _expected_got(wants: list[str], answer: str) -> str:
    return f"expected {_or(wants)}, got {_clip(answer.strip())!r}"


def _or(wants: list[str]) -> str:
    return " or ".join(repr(w) for w in wants)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _num(x: float) -> str:
    return f"{x:g}"


def _dump(value: Any) -> str:
    return _clip(json.dumps(value, ensure_ascii=False, default=str))
