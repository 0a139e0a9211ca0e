"""Eval suites on disk: parse, check, and fingerprint them.

A suite is either one JSONL file (an optional first line ``{"suite": {...settings}}``,
then one case a line) or a directory holding ``suite.toml`` (settings) and either
``cases.jsonl`` (a text suite: prompts graded by :mod:`appliance.evals.graders`) or
``cases.csv`` (a tensor suite: feature rows with a label, scored by a metric).

Loading is strict: an unknown key, a bad regex or a duplicate id is a
:class:`SuiteError` naming the file and line, because a suite that silently means less
than it says would let a worse model through the promotion gate. The suite's
``sha256`` is computed over the very bytes that were parsed, so a report can say
exactly which suite a score belongs to.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .graders import Grader, SuiteError, check_expected, parse_grader

MAX_FILE_BYTES = 64 * 1024 * 1024  # a suite file larger than this is refused

_ROLES = frozenset({"system", "user", "assistant"})
_CASE_KEYS = frozenset({"id", "messages", "prompt", "expected", "grader", "tags"})
_TEXT_SETTINGS = frozenset({"grader", "max_tokens", "temperature", "system"})
_TENSOR_SETTINGS = frozenset({"input", "output", "label", "metric", "features", "positive"})
_SETTINGS = (
    frozenset({"name", "description", "threshold", "margin", "kind"})
    | _TEXT_SETTINGS
    | _TENSOR_SETTINGS
)
METRICS = ("accuracy", "f1", "auc")


@dataclass(frozen=True)
class SuiteSettings:
    """A suite's settings, defaults filled in. ``threshold``: the least overall score a
    model must reach to be promoted (None: no floor); ``margin``: how much worse than
    the champion a candidate may be, overall and in each tag group. The tensor fields
    (``input`` to ``positive``) matter only for tensor suites; there ``features`` is
    the columns each case's features come from, in order (by default every column
    other than the label, ``id`` and ``tag:*``)."""

    name: str
    description: str = ""
    grader: Grader = field(default_factory=lambda: Grader("exact"))
    threshold: float | None = None
    margin: float = 0.0
    max_tokens: int = 64
    temperature: float = 0.0
    system: str | None = None
    kind: str = "text"
    input: str | None = None
    output: str | None = None
    label: str = "label"
    metric: str = "accuracy"
    features: list[str] | None = None
    positive: int = 1


@dataclass(frozen=True)
class Case:
    """One text case: ``messages`` ready to send (the suite's system prompt already
    prepended), ``line`` its line in the cases file."""

    id: str
    messages: list[dict[str, str]]
    expected: Any
    grader: Grader
    tags: dict[str, str]
    line: int


@dataclass(frozen=True)
class TensorCase:
    id: str
    features: list[float]
    label: int
    tags: dict[str, str]
    line: int


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    sha256: str
    kind: str
    settings: SuiteSettings
    cases: list[Case]
    tensor_cases: list[TensorCase]


def load_suite(path: Path) -> Suite:
    """Read, check and fingerprint the suite at ``path`` (a .jsonl file or a
    directory). Raises :class:`SuiteError` saying where and what is wrong."""
    path = Path(path)
    if path.is_dir():
        return _load_dir(path)
    data = _read(path)
    lines = _text_lines(data, str(path))
    raw_settings: dict[str, Any] = {}
    settings_where = str(path)
    if lines and _is_header(lines[0][1]):
        settings_where = f"{path} line {lines[0][0]}"
        raw_settings = _settings_table(lines[0][1], settings_where)
        lines = lines[1:]
    settings = _settings(raw_settings, path.stem, settings_where, has_csv=False)
    cases = _text_cases(lines, settings, str(path))
    return Suite(settings.name, path, _sha256(data), "text", settings, cases, [])


def tags_of(cases: Iterable[Case | TensorCase]) -> dict[str, list[str]]:
    """Each tag name the cases use, with its values, sorted."""
    found: dict[str, set[str]] = {}
    for case in cases:
        for name, value in case.tags.items():
            found.setdefault(name, set()).add(value)
    return {name: sorted(values) for name, values in sorted(found.items())}


def _load_dir(path: Path) -> Suite:
    files = _read_tree(path)
    toml_where = str(path / "suite.toml")
    raw_settings: dict[str, Any] = {}
    if "suite.toml" in files:
        try:
            raw_settings = tomllib.loads(_decode(files["suite.toml"], toml_where))
        except tomllib.TOMLDecodeError as e:
            raise SuiteError(f"{toml_where}: {e}") from None
    has_jsonl, has_csv = "cases.jsonl" in files, "cases.csv" in files
    if has_jsonl == has_csv:
        what = "both" if has_jsonl else "neither"
        raise SuiteError(f"{path}: needs cases.jsonl or cases.csv; it has {what}")
    settings = _settings(raw_settings, path.name, toml_where, has_csv=has_csv)
    sha = _tree_sha256(files)
    if has_csv:
        features, tensor = _tensor_cases(files["cases.csv"], settings, str(path / "cases.csv"))
        # Callers see the feature columns actually used, also when they were defaulted.
        settings = replace(settings, features=features)
        return Suite(settings.name, path, sha, "tensor", settings, [], tensor)
    where = str(path / "cases.jsonl")
    lines = _text_lines(files["cases.jsonl"], where)
    if lines and _is_header(lines[0][1]):
        raise SuiteError(f"{where} line {lines[0][0]}: settings belong in suite.toml")
    cases = _text_cases(lines, settings, where)
    return Suite(settings.name, path, sha, "text", settings, cases, [])


# --- reading and fingerprinting ---------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SuiteError(f"{path}: {size} bytes, more than the {MAX_FILE_BYTES} allowed")
        return path.read_bytes()
    except OSError as e:
        raise SuiteError(f"{path}: cannot read: {e.strerror or e}") from None


def _read_tree(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` by its relative POSIX path. Every file
    counts toward the fingerprint, also ones the loader does not read (a README)."""
    files: dict[str, bytes] = {}
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in names:
            full = Path(folder, name)
            if full.is_file():
                files[full.relative_to(root).as_posix()] = _read(full)
    return files


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tree_sha256(files: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\0{_sha256(files[rel])}\n".encode())
    return digest.hexdigest()


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SuiteError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _text_lines(data: bytes, where: str) -> list[tuple[int, dict[str, Any]]]:
    """Each non-blank line, numbered from 1, parsed as a JSON object."""
    out = []
    # Not splitlines(): U+2028 and friends may stand unescaped inside a JSON string.
    for number, line in enumerate(_decode(data, where).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line, object_pairs_hook=_no_duplicates, parse_constant=_no_nan)
        except ValueError as e:
            raise SuiteError(f"{where} line {number}: bad JSON: {e}") from None
        if not isinstance(value, dict):
            raise SuiteError(f"{where} line {number}: expected a JSON object")
        out.append((number, value))
    return out


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} given twice")
        out[key] = value
    return out


def _no_nan(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _is_header(obj: dict[str, Any]) -> bool:
    return "suite" in obj


def _settings_table(header: dict[str, Any], where: str) -> dict[str, Any]:
    if set(header) != {"suite"}:
        raise SuiteError(f'{where}: the settings line holds only "suite"')
    value = header["suite"]
    if not isinstance(value, dict):
        raise SuiteError(f'{where}: "suite" must be an object of settings')
    return value


# --- settings ---------------------------------------------------------------------


def _settings(raw: dict[str, Any], default_name: str, where: str, has_csv: bool) -> SuiteSettings:
    unknown = sorted(set(raw) - _SETTINGS)
    if unknown:
        raise SuiteError(f"{where}: unknown setting {unknown[0]!r}")
    kind = raw.get("kind", "tensor" if has_csv else "text")
    if kind not in ("text", "tensor"):
        raise SuiteError(f'{where}: kind must be "text" or "tensor", not {kind!r}')
    if (kind == "tensor") != has_csv:
        need = "a directory with cases.csv" if kind == "tensor" else "cases.jsonl"
        raise SuiteError(f"{where}: a {kind} suite needs {need}")
    wrong = sorted(set(raw) & (_TEXT_SETTINGS if kind == "tensor" else _TENSOR_SETTINGS))
    if wrong:
        raise SuiteError(f"{where}: setting {wrong[0]!r} is not for a {kind} suite")

    name = _string(raw, "name", where, default_name)
    threshold = raw.get("threshold")
    if threshold is not None and not (_number(threshold) and 0 <= threshold <= 1):
        raise SuiteError(f"{where}: threshold must be a number in [0, 1], not {threshold!r}")
    margin = raw.get("margin", 0.0)
    if not (_number(margin) and margin >= 0):
        raise SuiteError(f"{where}: margin must be a number >= 0, not {margin!r}")
    max_tokens = raw.get("max_tokens", 64)
    if not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0):
        raise SuiteError(f"{where}: max_tokens must be a positive integer, not {max_tokens!r}")
    temperature = raw.get("temperature", 0.0)
    if not (_number(temperature) and temperature >= 0):
        raise SuiteError(f"{where}: temperature must be a number >= 0, not {temperature!r}")
    common = {
        "name": name,
        "description": _string(raw, "description", where, ""),
        "threshold": None if threshold is None else float(threshold),
        "margin": float(margin),
        "kind": kind,
    }
    if kind == "text":
        system = raw.get("system")
        if system is not None and not isinstance(system, str):
            raise SuiteError(f"{where}: system must be a string")
        return SuiteSettings(
            **common,
            grader=parse_grader(raw.get("grader", "exact"), f"{where}: grader"),
            max_tokens=max_tokens,
            temperature=float(temperature),
            system=system,
        )
    for key in ("input", "output"):
        if key not in raw:
            raise SuiteError(f"{where}: a tensor suite needs {key!r} (the tensor's name)")
    metric = raw.get("metric", "accuracy")
    if metric not in METRICS:
        raise SuiteError(f"{where}: metric must be one of {', '.join(METRICS)}, not {metric!r}")
    features = raw.get("features")
    if features is not None and (
        not isinstance(features, list)
        or not features
        or not all(isinstance(f, str) and f for f in features)
    ):
        raise SuiteError(f"{where}: features must be a list of column names")
    positive = raw.get("positive", 1)
    if not isinstance(positive, int) or isinstance(positive, bool):
        raise SuiteError(f"{where}: positive must be an integer label, not {positive!r}")
    return SuiteSettings(
        **common,
        input=_string(raw, "input", where, ""),
        output=_string(raw, "output", where, ""),
        label=_string(raw, "label", where, "label"),
        metric=metric,
        features=features,
        positive=positive,
    )


def _string(raw: Mapping[str, Any], key: str, where: str, default: str) -> str:
    value = raw.get(key, default)
    if not isinstance(value, str) or (key != "description" and not value):
        raise SuiteError(f"{where}: {key} must be a non-empty string, not {value!r}")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --- cases ------------------------------------------------------------------------


def _text_cases(
    lines: Sequence[tuple[int, dict[str, Any]]], settings: SuiteSettings, where: str
) -> list[Case]:
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for number, obj in lines:
        at = f"{where} line {number}"
        case = _text_case(obj, len(cases) + 1, number, settings, at)
        if case.id in seen:
            raise SuiteError(f"{at}: id {case.id!r} already used on line {seen[case.id]}")
        seen[case.id] = number
        cases.append(case)
    if not cases:
        raise SuiteError(f"{where}: the suite has no cases")
    return cases


def _text_case(
    obj: dict[str, Any], index: int, line: int, settings: SuiteSettings, at: str
) -> Case:
    unknown = sorted(set(obj) - _CASE_KEYS)
    if unknown:
        hint = " (settings go on the first line)" if "suite" in unknown else ""
        raise SuiteError(f"{at}: unknown case key {unknown[0]!r}{hint}")
    case_id = obj.get("id", f"case-{index}")
    if not isinstance(case_id, str) or not case_id:
        raise SuiteError(f"{at}: id must be a non-empty string, not {case_id!r}")
    if ("messages" in obj) == ("prompt" in obj):
        raise SuiteError(f'{at}: case needs exactly one of "messages" and "prompt"')
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise SuiteError(f"{at}: prompt must be a string")
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        messages = _messages(obj["messages"], at)
    if settings.system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": settings.system})
    if "expected" not in obj:
        raise SuiteError(f'{at}: case needs "expected"')
    grader = settings.grader
    if "grader" in obj:
        grader = parse_grader(obj["grader"], at)
    check_expected(grader, obj["expected"], at)
    return Case(case_id, messages, obj["expected"], grader, _tags(obj.get("tags", {}), at), line)


def _messages(value: Any, at: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise SuiteError(f"{at}: messages must be a non-empty list")
    out = []
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or set(message) != {"role", "content"}
            or message["role"] not in _ROLES
            or not isinstance(message["content"], str)
        ):
            raise SuiteError(
                f"{at}: messages[{i}] must be {{role, content}} with role "
                f"system, user or assistant and content a string"
            )
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _tags(value: Any, at: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
    ):
        raise SuiteError(f"{at}: tags must be an object of strings")
    return dict(value)


def _tensor_cases(
    data: bytes, settings: SuiteSettings, where: str
) -> tuple[list[str], list[TensorCase]]:
    """The feature columns used, in order, and the cases."""
    reader = csv.reader(io.StringIO(_decode(data, where), newline=""))
    header = next(reader, None)
    if not header:
        raise SuiteError(f"{where}: no header row")
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise SuiteError(f"{where} line 1: a column name appears twice")
    if settings.label not in header:
        raise SuiteError(f"{where} line 1: no label column {settings.label!r}")
    tag_columns = {h: h[len("tag:") :] for h in header if h.startswith("tag:")}
    others = {settings.label, "id", *tag_columns}
    features = settings.features or [h for h in header if h not in others]
    for name in features:
        if name not in header or name in others:
            raise SuiteError(f"{where} line 1: feature {name!r} is not a feature column")
    if not features:
        raise SuiteError(f"{where} line 1: no feature columns")

    cases: list[TensorCase] = []
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        at = f"{where} line {line}"
        if len(row) != len(header):
            raise SuiteError(f"{at}: {len(row)} cells, the header has {len(header)}")
        cells = dict(zip(header, (c.strip() for c in row), strict=True))
        case_id = cells.get("id") or f"case-{len(cases) + 1}"
        if case_id in seen:
            raise SuiteError(f"{at}: id {case_id!r} already used on line {seen[case_id]}")
        seen[case_id] = line
        values = [_feature(cells[name], name, at) for name in features]
        try:
            label = int(cells[settings.label])
        except ValueError:
            raise SuiteError(
                f"{at}: label {cells[settings.label]!r} is not an integer class"
            ) from None
        tags = {tag: cells[col] for col, tag in tag_columns.items() if cells[col]}
        cases.append(TensorCase(case_id, values, label, tags, line))
    if not cases:
        raise SuiteError(f"{where}: the suite has no cases")
    return list(features), cases


def _feature(cell: str, name: str, at: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise SuiteError(f"{at}: feature {name!r} is not a number: {cell!r}") from None
    if not math.isfinite(value):
        raise SuiteError(f"{at}: feature {name!r} is not finite: {cell!r}")
    return value
