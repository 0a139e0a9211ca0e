"""`appliance adapters`: import a LoRA adapter (GGUF, or a PEFT directory converted),
list the adapters, write a specialist made of them."""

from __future__ import annotations

from pathlib import Path

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
)
from appliance.config import Settings


@main.group()
def adapters() -> None:
    """LoRA adapters for the chat models, and the specialists made of them."""


@adapters.command("import")
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.option("--name", required=True, help="Adapter name (lowercase, digits, . _ -).")
@click.option("--base", "base", required=True, help="The chat model it was trained on.")
@click.option(
    "--scale", type=float, default=1.0, show_default=True, help="Scale unless a specialist says."
)
@click.option("--domain", default="general", show_default=True, help="Domain or specialty.")
@click.option("--description", default="", help="What the adapter is for.")
@click.option("--license", "license_", default="unknown", show_default=True, help="License.")
@settings_options(PATH_SETTINGS)
@json_option
def adapters_import(
    source: Path,
    name: str,
    base: str,
    scale: float,
    domain: str,
    description: str,
    license_: str,
    settings: Settings,
    as_json: bool,
) -> None:
    """Install SOURCE (a GGUF LoRA adapter, or a PEFT directory: adapter_config.json and
    adapter_model.safetensors, converted) for chat model BASE, checked against its file."""
    from appliance.adapters import AdapterRefused, install_adapter

    weights = source / "adapter_model.safetensors" if source.is_dir() else source
    size = weights.stat().st_size if weights.is_file() else 0
    # The audit log is opened first: an action that cannot be recorded is not done.
    with audit_store(settings) as store, progress(f"importing {source.name}", size, as_json) as bar:
        try:
            manifest = install_adapter(
                settings,
                source,
                name,
                base,
                scale=scale,
                domain=domain,
                description=description,
                license=license_,
                progress=bar,
            )
        except AdapterRefused as exc:
            raise click.ClickException(str(exc)) from None
        fit = manifest.adapter
        assert fit is not None  # install_adapter writes kind adapter
        details = {
            "name": manifest.name,
            "file": manifest.file,
            "sha256": manifest.sha256,
            "base": fit.base,
            "base_sha256": fit.base_sha256,
            "source": str(source),
        }
        record_action(store, "adapters import", details)
    if as_json:
        print_json(manifest.public() | {"rank": fit.rank, "alpha": fit.alpha, "scale": fit.scale})
    else:
        click.echo(
            f"imported adapter {manifest.name} for {fit.base}: {manifest.file} "
            f"sha256 {manifest.sha256} (rank {fit.rank}, alpha {fit.alpha:g})"
        )
        click.echo(f"manifest: {manifest.origin}")


@adapters.command("list")
@settings_options(PATH_SETTINGS)
@json_option
def adapters_list(settings: Settings, as_json: bool) -> None:
    """The adapters: base, rank, alpha, scale, and whether the file is in place."""
    from appliance.registry import ManifestError, load_manifests

    try:
        manifests = load_manifests(settings)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    rows = []
    for m in manifests.values():
        if m.adapter is None:
            continue
        rows.append(
            {
                "name": m.name,
                "file": m.file,
                "sha256": m.sha256,
                "base": m.adapter.base,
                "base_sha256": m.adapter.base_sha256,
                "rank": m.adapter.rank,
                "alpha": m.adapter.alpha,
                "scale": m.adapter.scale,
                "installed": (settings.models_path / m.file).is_file(),
                "provenance": dict(m.adapter.provenance),
            }
        )
    if as_json:
        print_json(rows)
        return
    for r in rows:
        state = "installed" if r["installed"] else "missing"
        click.echo(
            f"{r['name']:28} base {r['base']:24} rank {r['rank']:<4} alpha {r['alpha']:<6g} "
            f"scale {r['scale']:<5g} {state}"
        )


def _adapter_arg(value: str) -> tuple[str, float | None]:
    name, sep, scale = value.partition(":")
    if not sep:
        return name, None
    try:
        return name, float(scale)
    except ValueError:
        raise click.BadParameter(f"{value!r}: the scale after ':' must be a number") from None


@adapters.command("specialist")
@click.argument("name")
@click.option("--base", "base", required=True, help="The chat model it is made on.")
@click.option(
    "--adapter",
    "adapter_args",
    multiple=True,
    help="An adapter, NAME or NAME:SCALE (default: its own scale); repeat for several.",
)
@click.option("--system-prompt", default=None, help="The system prompt it answers under.")
@click.option("--role", "roles", multiple=True, help="A role that may use it (default: any).")
@click.option("--description", default="", help="What the specialist is for.")
@click.option("--temperature", type=float, default=None, help="Default temperature.")
@click.option("--top-p", type=float, default=None, help="Default top_p.")
@click.option("--max-tokens", type=int, default=None, help="Default max_tokens.")
@settings_options(PATH_SETTINGS)
@json_option
def adapters_specialist(
    name: str,
    base: str,
    adapter_args: tuple[str, ...],
    system_prompt: str | None,
    roles: tuple[str, ...],
    description: str,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
    settings: Settings,
    as_json: bool,
) -> None:
    """Write specialist NAME: chat model BASE with the adapters given, served once the
    service restarts."""
    from appliance.adapters import AdapterRefused, write_specialist

    chosen = [_adapter_arg(a) for a in adapter_args]
    sampling = {
        k: v
        for k, v in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens))
        if v is not None
    }
    with audit_store(settings) as store:
        try:
            manifest = write_specialist(
                settings,
                name,
                base,
                chosen,
                system_prompt=system_prompt,
                roles=list(roles) or None,
                sampling=sampling or None,
                description=description,
            )
        except AdapterRefused as exc:
            raise click.ClickException(str(exc)) from None
        spec = manifest.specialist
        assert spec is not None  # write_specialist writes kind specialist
        details = {
            "name": manifest.name,
            "base": spec.base,
            "adapters": [{"name": n, "scale": s} for n, s in spec.adapters],
            "roles": list(spec.roles) if spec.roles is not None else None,
        }
        record_action(store, "adapters specialist", details)
    if as_json:
        print_json(manifest.public())
    else:
        used = ", ".join(f"{n}" + ("" if s is None else f" at {s:g}") for n, s in spec.adapters)
        click.echo(f"specialist {manifest.name}: {spec.base} with {used or 'no adapters'}")
        click.echo(f"manifest: {manifest.origin} (served from the next start)")
