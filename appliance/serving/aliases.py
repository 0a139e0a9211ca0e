"""Served names: a name clients use (``triage``) that points to a champion model, so
that promoting a better model, or rolling back, never changes what clients send.

Kept in ``STATE_DIR/aliases.json`` (written by ``appliance models promote`` and
``rollback``, each audited), read again by the server when the file changes.

    {"triage": {"champion": "triage-v2", "since": "...", "suite_sha256": "...",
                "history": [{"champion": "triage-v1", "since": "...", "until": "..."}]}}
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class AliasError(ValueError):
    pass


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class AliasTable:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._data: dict[str, dict[str, Any]] = {}

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    data = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    data = self._data  # half-written: keep what was read before
                self._stamp, self._data = stamp, data
            return dict(self._data)

    def all(self) -> dict[str, dict[str, Any]]:
        return self._read()

    def champion(self, name: str) -> str | None:
        entry = self._read().get(name)
        return str(entry["champion"]) if entry else None

    def resolve(self, name: str) -> str:
        """The model a name is served by: its champion, or the name itself."""
        return self.champion(name) or name

    def _write(self, data: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def promote(self, name: str, candidate: str, evidence: dict[str, Any]) -> str | None:
        """Point ``name`` at ``candidate``; the previous champion (None for a new name)."""
        if not NAME.match(name):
            raise AliasError(f"a served name must match {NAME.pattern}: {name!r}")
        data = self._read()
        entry = data.get(name)
        previous = entry["champion"] if entry else None
        history = list(entry.get("history", [])) if entry else []
        if entry:
            history.append(
                {
                    "champion": previous,
                    "since": entry.get("since"),
                    "until": _now(),
                    "evidence": entry.get("evidence"),
                }
            )
        data[name] = {
            "champion": candidate,
            "since": _now(),
            "evidence": evidence,
            "history": history,
        }
        self._write(data)
        return previous

    def rollback(self, name: str) -> tuple[str, str]:
        """Back to the champion before this one: (from, to)."""
        data = self._read()
        entry = data.get(name)
        if not entry:
            raise AliasError(f"{name!r} is not a served name")
        history = list(entry.get("history", []))
        if not history:
            raise AliasError(f"{name!r} has had no other champion than {entry['champion']!r}")
        last = history.pop()
        data[name] = {
            "champion": last["champion"],
            "since": _now(),
            "evidence": last.get("evidence"),
            "history": history,
            "rolled_back_from": entry["champion"],
        }
        self._write(data)
        return entry["champion"], last["champion"]
