"""A route's config (``STATE_DIR/routes/NAME.toml``, written by IT) and its calibration
(``NAME.calibration.json`` beside it, written by ``appliance route calibrate``).

    description = "Questions from the line's maintenance desk"
    embedding = "minilm-l6-v2"          # the model that compares questions to domains
    generalist = "gemma-3-270m"         # answers what no specialist covers
    referral = "Please ask the line supervisor: the appliance cannot answer this."
    roles = ["line", "admin"]           # optional: who may use the route

    [[specialists]]
    model = "line-defects"
    description = "defect codes for technicians' maintenance notes"
    examples = ["grinding noise from the spindle bearing", "belt squeals at start-up"]

The thresholds are not hand-set: a route without a calibration is refused (503) until
``appliance route calibrate`` has measured them on an eval suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_EXAMPLES = 64


class RouteError(ValueError):
    pass


@dataclass(frozen=True)
class Domain:
    model: str
    description: str
    examples: tuple[str, ...]

    def texts(self) -> list[str]:
        return [self.description, *self.examples]


@dataclass(frozen=True)
class Calibration:
    """Thresholds measured on a suite: a question goes to the specialist whose domain
    is at least ``similarity`` like it; an answer stands when its confidence (the
    geometric mean of its tokens' probabilities) reaches the answering model's
    threshold."""

    similarity: float
    specialist_confidence: float
    generalist_confidence: float
    suite: str
    suite_sha256: str
    target_error: float
    calibrated_at: str
    measured: dict[str, Any]
    config_sha256: str = ""  # the route's config it was measured for
    # The sampling temperature its answers were measured at (calibrate asks greedy): the
    # confidence thresholds hold at it alone, so the route answers at it.
    temperature: float = 0.0

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Route:
    name: str
    path: Path
    sha256: str  # the config file's
    description: str
    embedding: str
    generalist: str
    referral: str
    specialists: tuple[Domain, ...]
    roles: tuple[str, ...] | None
    calibration: Calibration | None  # None also when it was measured for another config
    stale_calibration: bool = False  # the config changed since its calibration

    def models(self) -> list[str]:
        return [d.model for d in self.specialists] + [self.generalist]

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "embedding": self.embedding,
            "generalist": self.generalist,
            "specialists": [d.model for d in self.specialists],
            "roles": list(self.roles) if self.roles is not None else None,
            "config_sha256": self.sha256,
            "calibration": self.calibration.public() if self.calibration else None,
            "stale_calibration": self.stale_calibration,
        }


def _text(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RouteError(f"{where}: {key} must be a non-empty string")
    return value


def calibration_path(path: Path) -> Path:
    return path.with_name(path.stem + ".calibration.json")


def read_route(path: Path) -> Route:
    where = str(path)
    name = path.stem
    if not NAME.match(name):
        raise RouteError(f"{where}: a route's file name must match {NAME.pattern}")
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RouteError(f"{where}: {exc}") from None
    known = {"description", "embedding", "generalist", "referral", "roles", "specialists"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RouteError(f"{where}: unknown keys {', '.join(unknown)}")
    table = data.get("specialists")
    if not isinstance(table, list) or not table:
        raise RouteError(f"{where}: a route needs at least one [[specialists]] table")
    domains = []
    for i, item in enumerate(table):
        at = f"{where}: specialists[{i}]"
        if not isinstance(item, dict) or set(item) - {"model", "description", "examples"}:
            raise RouteError(f"{at}: takes model, description and examples")
        examples = item.get("examples", [])
        if not isinstance(examples, list) or not all(
            isinstance(e, str) and e.strip() for e in examples
        ):
            raise RouteError(f"{at}: examples must be a list of non-empty strings")
        if len(examples) > MAX_EXAMPLES:
            raise RouteError(f"{at}: {len(examples)} examples; at most {MAX_EXAMPLES}")
        domains.append(
            Domain(_text(item, "model", at), _text(item, "description", at), tuple(examples))
        )
    models = [d.model for d in domains]
    if len(set(models)) != len(models):
        raise RouteError(f"{where}: a specialist is listed twice")
    roles = data.get("roles")
    if roles is not None and (
        not isinstance(roles, list) or not all(isinstance(r, str) for r in roles)
    ):
        raise RouteError(f"{where}: roles must be a list of role names")
    generalist = _text(data, "generalist", where)
    if generalist in models:
        raise RouteError(f"{where}: the generalist {generalist!r} is also a specialist")
    config_sha = hashlib.sha256(raw).hexdigest()
    calibration = _read_calibration(calibration_path(path))
    stale = calibration is not None and calibration.config_sha256 != config_sha
    return Route(
        name=name,
        path=path,
        sha256=config_sha,
        description=str(data.get("description", "")),
        embedding=_text(data, "embedding", where),
        generalist=generalist,
        referral=_text(data, "referral", where),
        specialists=tuple(domains),
        roles=tuple(roles) if roles is not None else None,
        calibration=None if stale else calibration,
        stale_calibration=stale,
    )


def _read_calibration(path: Path) -> Calibration | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        calibration = Calibration(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise RouteError(f"{path}: not a calibration this appliance wrote: {exc}") from None
    temperature = calibration.temperature
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0:
        raise RouteError(f"{path}: temperature must be a number >= 0, not {temperature!r}")
    return calibration


def write_calibration(route: Route, calibration: Calibration) -> Path:
    path = calibration_path(route.path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(calibration.public(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


class RouteTable:
    """The routes in a directory, read again when a file there changes (a calibration
    or an edit takes effect on the next request, without a restart)."""

    def __init__(self, directory: Path, taken: Callable[[str], bool] = lambda name: False) -> None:
        """``taken``: whether a name is a model's (a route may not shadow a model)."""
        self.directory = directory
        self.taken = taken
        self._lock = threading.Lock()
        self._seen: tuple[tuple[str, int, int], ...] | None = None
        self._routes: dict[str, Route] = {}
        self.problems: dict[str, str] = {}  # route -> why it is not served

    def _stamp(self) -> tuple[tuple[str, int, int], ...]:
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except OSError:
            return ()
        stamp = []
        for entry in entries:
            if entry.name.endswith((".toml", ".calibration.json")):
                try:
                    st = entry.stat()
                except OSError:  # removed meanwhile
                    continue
                stamp.append((entry.name, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def routes(self) -> dict[str, Route]:
        stamp = self._stamp()
        with self._lock:
            if stamp != self._seen:
                self._seen = stamp
                self._routes, self.problems = {}, {}
                for name, _, _ in stamp:
                    if not name.endswith(".toml"):
                        continue
                    path = self.directory / name
                    if self.taken(path.stem):
                        self.problems[path.stem] = (
                            f"{path}: {path.stem!r} is a model's name; a route needs its own"
                        )
                        continue
                    try:
                        self._routes[path.stem] = read_route(path)
                    except RouteError as exc:
                        self.problems[path.stem] = str(exc)
            return dict(self._routes)

    def get(self, name: str) -> Route | None:
        return self.routes().get(name)
