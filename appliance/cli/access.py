"""`appliance tokens`, `appliance users`, `appliance tls`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from appliance.cli.common import (
    PATH_SETTINGS,
    audit_store,
    json_option,
    main,
    print_json,
    record_action,
    settings_options,
)
from appliance.config import Settings


@main.group()
def tokens() -> None:
    """API tokens (Authorization: Bearer) and their roles."""


@contextmanager
def _auth_store(settings: Settings) -> Iterator[Any]:
    from appliance.auth.store import AuthStore

    store = AuthStore(settings)
    try:
        yield store
    finally:
        store.close()


def _auth_call(
    settings: Settings,
    action: str,
    call: Callable[[Any], Any],
    details: Callable[[Any], dict[str, Any]],
) -> Any:
    """Run an auth change with its admin audit record; refused if it cannot be recorded."""
    from appliance.auth.store import AuthError

    with audit_store(settings) as log, _auth_store(settings) as store:
        try:
            result = call(store)
        except AuthError as exc:
            raise click.ClickException(str(exc)) from None
        record_action(log, action, details(result))
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
        print_json(result)
    else:
        click.echo(f"token {result['id']} ({role}) for {name}; copy it now, it is not shown again:")
        click.echo(result["token"])


@tokens.command("list")
@settings_options(PATH_SETTINGS)
@json_option
def tokens_list(settings: Settings, as_json: bool) -> None:
    """Tokens (never their secrets)."""
    with _auth_store(settings) as store:
        rows = store.list_tokens()
    if as_json:
        print_json(rows)
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
        print_json(result)
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
    print_json(result) if as_json else click.echo(f"user {name} ({role}) added")


@users.command("list")
@settings_options(PATH_SETTINGS)
@json_option
def users_list(settings: Settings, as_json: bool) -> None:
    """Accounts, with their state."""
    with _auth_store(settings) as store:
        rows = store.list_users()
    if as_json:
        print_json(rows)
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
    print_json(result) if as_json else click.echo(f"user {name} disabled")


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
    print_json(result) if as_json else click.echo(f"password of {name} reset")


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

    with audit_store(settings) as store:
        try:
            result = init_tls(settings, list(names))
        except TLSError as exc:
            raise click.ClickException(str(exc)) from None
        record_action(store, "tls init", result)
    if as_json:
        print_json(result)
    else:
        click.echo(f"server certificate {result['cert']} for {', '.join(result['names'])}")
        click.echo(f"valid until {result['not_after']}; clients trust {result['ca']}")
