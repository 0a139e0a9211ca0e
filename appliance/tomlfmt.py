"""Writes the small, flat TOML documents the appliance produces (manifests, config)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        # A JSON string with ASCII escapes is also a valid TOML basic string.
        return json.dumps(value, ensure_ascii=True)
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dumps_flat(data: Mapping[str, Any]) -> str:
    """One ``key = value`` line per entry; None values are left out."""
    return "".join(f"{k} = {format_value(v)}\n" for k, v in data.items() if v is not None)
