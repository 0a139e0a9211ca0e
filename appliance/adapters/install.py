"""Installing a LoRA adapter (a GGUF file, or a PEFT directory converted) with its
manifest of kind adapter, and writing the manifest of a specialist that names adapters:
all or nothing, and checked as the registry and the pool will read them."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance.adapters.convert import check_gguf_adapter, peft_to_gguf
from appliance.adapters.formats import AdapterRefused
from appliance.config import Settings
from appliance.registry import (
    NAME_RE,
    HashCache,
    Manifest,
    ManifestError,
    Progress,
    copy_hashing,
    hash_file,
    load_manifests,
    parse_manifest,
    verify_model,
)
from appliance.tomlfmt import format_value

BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _manifests(settings: Settings) -> dict[str, Manifest]:
    try:
        return load_manifests(settings)
    except ManifestError as exc:
        raise AdapterRefused(str(exc)) from None


def _check_new_name(name: str, manifests: Mapping[str, Manifest], settings: Settings) -> Path:
    """The manifest path for a new model ``name``; refused if the name is taken."""
    if not NAME_RE.match(name):
        raise AdapterRefused(f"name {name!r} must match {NAME_RE.pattern} (lowercase, digits, ._-)")
    if name in manifests:
        raise AdapterRefused(f"a model named {name!r} exists already ({manifests[name].origin})")
    path = settings.imported_manifests_path / f"{name}.toml"
    if path.exists():
        raise AdapterRefused(f"{path} exists already")
    return path


def _chat_base(settings: Settings, manifests: Mapping[str, Manifest], base_name: str) -> Manifest:
    base = manifests.get(base_name)
    if base is None or base.kind != "chat":
        chats = sorted(n for n, m in manifests.items() if m.kind == "chat")
        what = "does not exist" if base is None else f"is kind {base.kind}, not chat"
        raise AdapterRefused(
            f"base {base_name!r} {what}; chat models: {', '.join(chats) or 'none'}"
        )
    return base


def _toml_document(top: Mapping[str, Any], tables: Mapping[str, Mapping[str, Any]]) -> str:
    """A manifest: top-level keys, then each table (a list of mappings: an array of
    tables). A key that is not a bare TOML key is quoted, so that any provenance key is
    valid TOML. (tomlfmt.dumps_flat writes no tables.)"""

    def line(key: str, value: Any) -> str:
        name = key if BARE_KEY.match(key) else format_value(key)
        if isinstance(value, list | tuple):
            return f"{name} = [{', '.join(format_value(v) for v in value)}]\n"
        return f"{name} = {format_value(value)}\n"

    text = "".join(line(k, v) for k, v in top.items() if v is not None)
    for table, body in tables.items():
        rows = body if isinstance(body, list) else [body]
        header = f"[[{table}]]" if isinstance(body, list) else f"[{table}]"
        for row in rows:
            text += f"\n{header}\n" + "".join(line(k, v) for k, v in row.items() if v is not None)
    return text


def _parse_written(text: str, where: Path) -> Manifest:
    """The manifest as the registry will read it: what is written must load."""
    try:
        return parse_manifest(tomllib.loads(text), str(where))
    except (ManifestError, tomllib.TOMLDecodeError) as exc:
        raise AdapterRefused(f"the manifest would not load: {exc}") from None


def _place(staged: Path, target: Path) -> None:
    """Move ``staged`` to ``target`` unless ``target`` exists: a hard link fails on an
    existing name, where a rename would replace it (another import at the same time)."""
    try:
        os.link(staged, target)
    except FileExistsError:
        raise AdapterRefused(f"{target} exists already") from None
    except OSError:  # a filesystem without hard links
        if target.exists():
            raise AdapterRefused(f"{target} exists already") from None
        os.replace(staged, target)
    else:
        staged.unlink()


def _write_new(path: Path, text: str) -> None:
    """Write a new file whole, or refuse if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        _place(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def install_adapter(
    settings: Settings,
    source: Path,
    name: str,
    base_name: str,
    *,
    scale: float = 1.0,
    domain: str = "general",
    description: str = "",
    license: str = "unknown",
    provenance: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Install the LoRA adapter ``source`` (a GGUF adapter file, or a PEFT directory,
    converted) for the chat model ``base_name``, checked against that model's verified
    file: the GGUF goes into the model directory as NAME.gguf and its manifest (kind
    adapter, [adapter] and [provenance]) into STATE_DIR/manifests. All or nothing."""
    manifests = _manifests(settings)
    manifest_path = _check_new_name(name, manifests, settings)
    base = _chat_base(settings, manifests, base_name)
    verification = verify_model(
        base, settings.models_path, HashCache(settings.cache_path / "sha256.json")
    )
    if not verification.ok:
        raise AdapterRefused(f"base {base_name!r} cannot take an adapter: {verification.message}")
    if not 0.0 <= scale <= 10.0:
        raise AdapterRefused(f"scale must be from 0 to 10, got {scale}")
    given = dict(provenance or {})
    for key in ("imported_from", "format"):
        if key in given:
            raise AdapterRefused(f"provenance {key!r} is set by the import itself")
    for key, value in given.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise AdapterRefused(f"provenance must map names to strings, got {key!r}: {value!r}")
    target = settings.models_path / f"{name}.gguf"
    taken = {m.file for m in manifests.values()}
    if target.exists() or target.name in taken:
        raise AdapterRefused(f"{target} exists already")
    base_path = settings.models_path / base.file
    settings.models_path.mkdir(parents=True, exist_ok=True)
    staged = settings.models_path / f".{target.name}.{os.getpid()}.partial"
    staged.unlink(missing_ok=True)
    try:
        if source.is_dir():
            facts = peft_to_gguf(source, base_path, staged)
            sha = hash_file(staged, progress)
            fmt, how = "peft", "converted from the PEFT adapter"
        elif source.is_file():
            # The copy is what is checked, so the file cannot change in between.
            try:
                with source.open("rb") as fin:
                    sha = copy_hashing(fin, staged, progress)
            except OSError as exc:
                raise AdapterRefused(f"{source}: {exc}") from None
            facts = check_gguf_adapter(staged, base_path)
            fmt, how = "gguf", "imported from"
        else:
            raise AdapterRefused(f"{source} is neither a GGUF adapter file nor a PEFT directory")
        record = {"imported_from": str(source.resolve()), "format": fmt}
        if facts.base_model:
            record["base_model_name_or_path"] = facts.base_model
        text = _toml_document(
            {
                "name": name,
                "kind": "adapter",
                "file": target.name,
                "sha256": sha,
                "format": "gguf",
                "quantization": facts.quantization,
                "parameters": facts.parameters,
                "domain": domain,
                "license": license,
                "source": f"{how} {source.resolve()}",
                "description": description,
                "size_bytes": staged.stat().st_size,
            },
            {
                "adapter": {
                    "base": base.name,
                    "base_sha256": base.sha256,
                    "rank": facts.rank,
                    "alpha": facts.alpha,
                    "scale": float(scale),
                },
                "provenance": {**record, **given},
            },
        )
        manifest = _parse_written(text, manifest_path)
        _place(staged, target)
        try:
            _write_new(manifest_path, text)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    finally:
        staged.unlink(missing_ok=True)
    return manifest


def write_specialist(
    settings: Settings,
    name: str,
    base: str,
    adapters: list[tuple[str, float | None]],
    system_prompt: str | None = None,
    roles: list[str] | None = None,
    sampling: Mapping[str, float | int] | None = None,
    description: str = "",
) -> Manifest:
    """Write STATE_DIR/manifests/NAME.toml for a specialist: the chat model ``base`` with
    ``adapters`` (name, scale; None: the adapter's own scale), checked as the pool will
    check it (each adapter made for that very base file), so that it serves."""
    from appliance.auth.store import ROLES

    manifests = _manifests(settings)
    manifest_path = _check_new_name(name, manifests, settings)
    base_manifest = _chat_base(settings, manifests, base)
    seen: set[str] = set()
    rows = []
    for adapter_name, scale in adapters:
        adapter = manifests.get(adapter_name)
        if adapter is None or adapter.adapter is None:
            what = "does not exist" if adapter is None else f"is kind {adapter.kind}, not adapter"
            raise AdapterRefused(f"adapter {adapter_name!r} {what}")
        if adapter_name in seen:
            raise AdapterRefused(f"adapter {adapter_name!r} is named twice")
        seen.add(adapter_name)
        fit = adapter.adapter
        if fit.base != base or fit.base_sha256 != base_manifest.sha256:
            raise AdapterRefused(
                f"adapter {adapter_name!r} was made for base {fit.base!r} with sha256 "
                f"{fit.base_sha256}; base {base!r} has sha256 {base_manifest.sha256}"
            )
        rows.append({"name": adapter_name, "scale": None if scale is None else float(scale)})
    for role in roles or []:
        if role not in ROLES:
            raise AdapterRefused(f"role {role!r} is not one of {', '.join(ROLES)}")
    unknown = sorted(set(sampling or {}) - {"temperature", "top_p", "max_tokens"})
    if unknown:
        raise AdapterRefused(
            f"unknown sampling setting(s) {', '.join(unknown)}; known: temperature, top_p, "
            "max_tokens"
        )
    tables: dict[str, Any] = {}
    if sampling:
        tables["sampling"] = dict(sampling)
    if rows:
        tables["adapters"] = rows
    text = _toml_document(
        {
            "name": name,
            "kind": "specialist",
            "base": base,
            "description": description,
            "system_prompt": system_prompt,
            "roles": list(roles) if roles is not None else None,
        },
        tables,
    )
    manifest = _parse_written(text, manifest_path)
    _write_new(manifest_path, text)
    return manifest
