"""What every command shares: the root group, settings flags from the schema, --json,
progress bars, the audit log for recording administrative actions."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from appliance import config
from appliance.config import Settings, SettingsError
from appliance.registry import Manifest, Progress

PATH_SETTINGS = ("state_dir", "model_dir", "manifest_dir")
# A command that talks to the running appliance: where it listens, and how.
SERVER_SETTINGS = (*PATH_SETTINGS, "host", "port", "tls")
BIG_FILE = 32 << 20


def _option_for(spec: config.SettingSpec) -> Callable[[Any], Any]:
    kind: Any = click.Path(path_type=Path) if spec.kind is Path else spec.kind
    default = "derived" if spec.name == "state_dir" else spec.default
    if spec.kind is bool:
        return click.option(
            spec.flag,
            spec.name,
            is_flag=True,
            default=None,
            help=f"{spec.help} [env {spec.env}]",
        )
    return click.option(
        spec.flag,
        spec.name,
        type=kind,
        default=None,
        help=f"{spec.help} [env {spec.env}; default {default}]",
    )


def settings_options(names: tuple[str, ...] | None = None) -> Callable[[Any], Any]:
    """Add --config and the flags of the named settings (all when None); the command
    receives ``settings`` built from defaults < file < env < flags."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        specs = [s for s in config.schema() if names is None or s.name in names]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            config_file = kwargs.pop("config_file")
            overrides = {s.name: kwargs.pop(s.name) for s in specs}
            try:
                settings = config.load_settings(config_file, overrides=overrides)
            except SettingsError as exc:
                raise click.ClickException(str(exc)) from None
            return func(*args, settings=settings, **kwargs)

        for spec in reversed(specs):
            wrapper = _option_for(spec)(wrapper)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help=f"TOML settings file [env {config.CONFIG_ENV}].",
        )(wrapper)

    return decorate


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@contextmanager
def progress(label: str, size: int, quiet: bool) -> Iterator[Progress | None]:
    """A progress bar on stderr for big files; nothing for small ones or with --json."""
    if quiet or size < BIG_FILE:
        yield None
        return
    with click.progressbar(length=size, label=label, file=sys.stderr) as bar:
        yield bar.update


@click.group()
@click.version_option(package_name="appliance")
def main() -> None:
    """On-prem inference appliance: specialist models served locally, audited, measured."""


@contextmanager
def audit_store(settings: Settings, create_keys: bool = True) -> Iterator[Any]:
    """The audit log for a CLI command. Keys are created only for a log that has no
    record under them yet (a first install); otherwise a missing key is an error."""
    from appliance.audit.crypto import AuditKeyError
    from appliance.audit.store import AuditStore

    try:
        store = AuditStore(settings, create_keys=create_keys)
    except AuditKeyError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield store
    finally:
        store.close()


def record_action(store: Any, action: str, details: dict[str, Any]) -> None:
    """An administrative action as an audit record; the command fails if it cannot be."""
    from appliance.audit.store import AuditUnavailable, record_admin

    try:
        record_admin(store, action, details)
    except AuditUnavailable as exc:
        raise click.ClickException(f"not done: {exc}") from None


@contextmanager
def verification_bars(quiet: bool) -> Iterator[Callable[[Manifest, int], Progress | None]]:
    """A progress bar per big model file being hashed, on stderr."""
    bars: list[Any] = []

    def progress_for(manifest: Manifest, size: int) -> Progress | None:
        if quiet or size < BIG_FILE:
            return None
        bar = click.progressbar(length=size, label=f"hashing {manifest.file}", file=sys.stderr)
        bars.append(bar)
        return bar.__enter__().update

    try:
        yield progress_for
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)


def server_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--token and --url, for a command that calls the running appliance's API."""
    func = click.option(
        "--url", default=None, help="The appliance's URL (default: from the settings)."
    )(func)
    return click.option(
        "--token",
        envvar="APPLIANCE_TOKEN",
        default=None,
        help="API token (default: one made for the command and revoked after it).",
    )(func)
