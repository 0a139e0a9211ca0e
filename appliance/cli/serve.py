"""`appliance serve` and `appliance config`."""

from __future__ import annotations

import sys

import click

from appliance import config
from appliance.cli.common import (
    json_option,
    main,
    print_json,
    settings_options,
    verification_bars,
)
from appliance.config import Settings
from appliance.registry import ManifestError


def _check_audit_keys(settings: Settings) -> None:
    """Refuse to start, saying why, when the audit log cannot be opened (a key file
    readable by others, a missing key for existing records...)."""
    from appliance.audit.crypto import AuditKeyError
    from appliance.audit.store import AuditStore

    try:
        AuditStore(settings).close()
    except AuditKeyError as exc:
        raise click.ClickException(f"refusing to start: {exc}") from None


@main.command()
@settings_options()
def serve(settings: Settings) -> None:
    """Serve the verified models over HTTP (gunicorn; SIGTERM stops gracefully)."""
    from appliance.keyfiles import KeyFileError
    from appliance.registry import load_manifests, verify_all
    from appliance.server import serve as run_server
    from appliance.tls import TLSError, check_serving

    # Hash before the server starts, with progress bars: the worker then finds the
    # results in the cache instead of hashing big files inside its boot timeout.
    try:
        manifests = load_manifests(settings)
    except ManifestError:
        manifests = {}  # the server reports it as not ready, with the reason
    with verification_bars(quiet=False) as progress_for:
        verify_all(settings, manifests.values(), progress_for=progress_for)
    _check_audit_keys(settings)
    try:
        check_serving(settings)
    except (TLSError, KeyFileError) as exc:
        raise click.ClickException(str(exc)) from None
    run_server(settings)


@main.group(name="config")
def config_group() -> None:
    """Inspect the settings."""


@config_group.command("show")
@settings_options()
@json_option
def config_show(settings: Settings, as_json: bool) -> None:
    """The settings in force, after file, environment and flags."""
    values = settings.as_dict()
    if as_json:
        print_json(values)
        return
    for key, value in values.items():
        click.echo(f"{key} = {value}")


@config_group.command("docs")
def config_docs() -> None:
    """Every setting as a Markdown table (name, env, flag, default, meaning)."""
    click.echo(config.docs_markdown(), nl=False)


@config_group.command("sample")
def config_sample() -> None:
    """A TOML file with every setting commented out at its default."""
    click.echo(config.sample_toml(), nl=False)


@main.command()
@settings_options()
@json_option
def doctor(settings: Settings, as_json: bool) -> None:
    """Check the machine: CPU, memory against the models, disk, GPU, key permissions,
    certificate, audit chain. Exit 1 when something fails."""
    from appliance.doctor import as_dicts, examine

    checks = examine(settings, selftest=True)
    if as_json:
        print_json(as_dicts(checks))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            click.echo(f"{c.status.upper():5} {c.name:{width}}  {c.detail}")
    sys.exit(1 if any(c.status == "fail" for c in checks) else 0)
