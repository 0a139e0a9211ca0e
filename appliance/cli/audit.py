"""`appliance audit`: verify, show, export, rotate-key, purge, backup."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from appliance.cli.common import (
    audit_store,
    json_option,
    main,
    print_json,
    record_action,
    settings_options,
)
from appliance.config import Settings, SettingsError


@main.group()
def audit() -> None:
    """The audit log: verify, read, keep."""


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
    help="Trusted checkpoint public key [default: the trusted_public_key setting].",
)
@click.option(
    "--trust-database-key",
    is_flag=True,
    help="With no public-key file, check against the key the database names (weaker: "
    "whoever can write the database can re-sign it).",
)
@click.option(
    "--without-external",
    is_flag=True,
    help="Go on without the external checkpoint file (a rollback then goes unseen).",
)
@settings_options()
@json_option
def audit_verify(
    checkpoints: Path | None,
    public_key: Path | None,
    trust_database_key: bool,
    without_external: bool,
    settings: Settings,
    as_json: bool,
) -> None:
    """Check every record, link and signature, and the database against the external
    checkpoints. Needs no decryption key, but a trusted public key and the external
    checkpoint file (each can be waived, weakening the check). With witness_key set,
    the witness's cosignatures too: each genuine, and each cosigned Merkle root that of
    the records now. Exit 0 only when all holds."""
    from appliance.audit import chain, crypto

    key_path = public_key or settings.trusted_public_key_path
    trusted = None
    if public_key is not None or key_path.exists():
        try:
            trusted = crypto.load_public_key(key_path)
        except crypto.AuditKeyError as exc:
            raise click.ClickException(str(exc)) from None
    from appliance.audit.witness import cosigned_path

    report = chain.verify(
        settings.audit_db_path,
        trusted,
        checkpoints or settings.checkpoint_path,
        trust_database_key=trust_database_key,
        without_external=without_external,
        witness_key=settings.witness_key,
        cosigned_file=cosigned_path(settings),
    )
    if as_json:
        print_json(report.as_dict())
    else:
        if report.ok:
            click.echo(
                f"ok: {report.records} records (up to {report.head_seq}), "
                f"{report.checkpoints} checkpoints, {report.external_checkpoints} "
                "external checkpoints verified"
            )
            if report.witnessed:
                seen = report.witnessed
                click.echo(
                    f"witnessed: {seen['cosignatures']} cosignatures of {seen['witness']} "
                    f"verified, the latest on {seen['size']} records at {seen['at']}"
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

    with audit_store(settings, create_keys=False) as store:
        found = list(records(store, seq=seq))
        if not found:
            raise click.ClickException(f"no record {seq}")
        record_action(store, "audit show", {"seq": seq})
    if as_json:
        print_json(found[0])
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
    with audit_store(settings, create_keys=False) as store:
        record_action(
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

    with audit_store(settings) as store:
        try:
            key_id = store.rotate_key()
        except AuditKeyError as exc:
            raise click.ClickException(str(exc)) from None
        record_action(store, "audit rotate-key", {"key_id": key_id})
    if as_json:
        print_json({"key_id": key_id})
    else:
        click.echo(f"new primary data key {key_id}")


@audit.command("purge")
@click.option("--before", required=True, help="Remove records older than this ISO date/time.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Say what would go (records by kind, refusals of unknown callers, the newest "
    "time cut) and remove nothing.",
)
@settings_options()
@json_option
def audit_purge(before: str, dry_run: bool, settings: Settings, as_json: bool) -> None:
    """Remove old records; a signed checkpoint at the cut keeps the rest verifiable."""
    from appliance.audit.reader import ReadError, parse_time
    from appliance.audit.store import local_actor

    try:
        cutoff = parse_time(before)
    except ReadError as exc:
        raise click.ClickException(str(exc)) from None
    with audit_store(settings) as store:
        if dry_run:
            preview = store.purge_preview(cutoff)
            if as_json:
                print_json({"before": cutoff, "would_purge": preview})
            else:
                click.echo(
                    f"would purge {preview['records']} records up to {preview['through']} "
                    f"(newest {preview['newest']}): {preview['by_kind']}, of which "
                    f"{preview['unknown_refusals']} refusals of unknown callers"
                )
            return
        if settings.witness_url:  # the witness sees every record before they go
            _cosign(settings, store)
        last = store.purge_before(cutoff, local_actor().id or "local")
        record_action(store, "audit purge", {"before": cutoff, "purged_through": last})
    if as_json:
        print_json({"before": cutoff, "purged_through": last})
    else:
        click.echo(f"purged records up to {last}" if last else "nothing older than that")


@audit.command("backup")
@click.argument("dest", type=click.Path(path_type=Path, dir_okay=False))
@settings_options()
@json_option
def audit_backup(dest: Path, settings: Settings, as_json: bool) -> None:
    """A consistent copy of the live audit database (SQLite backup API)."""
    from appliance.audit.reader import ReadError, backup

    with audit_store(settings) as store:
        record_action(store, "audit backup", {"dest": str(dest)})
        try:
            pages = backup(store, dest)
        except ReadError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        print_json({"dest": str(dest), "pages": pages})
    else:
        click.echo(f"backed up to {dest} ({pages} pages)")


def _cosign(settings: Settings, store: Any) -> bool:
    """Cosign the log now; say why not on stderr."""
    from appliance.audit.merkle import MissingNodes
    from appliance.audit.witness import WitnessClient, WitnessError

    try:
        WitnessClient(settings, store).cosign()
    except (WitnessError, MissingNodes) as exc:
        click.echo(f"not witnessed: {exc}", err=True)
        return False
    return True


@audit.command("log-key")
@settings_options()
@json_option
def audit_log_key(settings: Settings, as_json: bool) -> None:
    """This box's log as a witness knows it: its origin and its verifier key (vkey)."""
    from appliance.audit.witness import log_origin, log_vkey

    with audit_store(settings) as store:
        origin = log_origin(store.origin)
        vkey = log_vkey(origin, store.signing_key.public_key())
    if as_json:
        print_json({"origin": origin, "vkey": vkey})
    else:
        click.echo(f"origin {origin}\nvkey   {vkey}")


@audit.command("cosign")
@settings_options()
@json_option
def audit_cosign(settings: Settings, as_json: bool) -> None:
    """Send the log's checkpoint to the witness now and keep its cosignature; exit 1
    when the witness is away or refuses it (a rewritten or rolled-back log)."""
    from appliance.audit.merkle import MissingNodes
    from appliance.audit.witness import WitnessClient, WitnessError, WitnessRefused

    if not settings.witness_url:
        raise click.ClickException("no witness: set witness_url and witness_key")
    with audit_store(settings) as store:
        try:
            cosigned = WitnessClient(settings, store).cosign()
        except (WitnessError, MissingNodes, SettingsError) as exc:
            refused = isinstance(exc, WitnessRefused)
            if as_json:
                print_json({"cosigned": False, "refused": refused, "error": str(exc)})
            else:
                click.echo(f"{'REFUSED' if refused else 'not witnessed'}: {exc}", err=True)
            sys.exit(1)
    if as_json:
        print_json({"cosigned": True, "size": cosigned.size, "root": cosigned.root.hex()})
    else:
        click.echo(f"cosigned: {cosigned.size} records, root {cosigned.root.hex()}")
