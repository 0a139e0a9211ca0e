"""`appliance docs`: the site's documents for grounded answers: add (or version),
list, remove, reindex, and which roles may read a collection."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import psutil

from appliance.cli.common import (
    PATH_SETTINGS,
    SERVER_SETTINGS,
    audit_store,
    json_option,
    main,
    print_json,
    record_action,
    server_options,
    settings_options,
)
from appliance.config import Settings

DEFAULT_EMBEDDING = "minilm-l6-v2"


@main.group("docs")
def docs_group() -> None:
    """Document collections that answers can be grounded on, with citations."""


@contextmanager
def _store(settings: Settings) -> Iterator[Any]:
    from appliance.audit.crypto import AuditKeyError, load_master_key
    from appliance.docs.store import DocStore

    try:
        master = load_master_key(settings.master_key_path, create=False)
    except (AuditKeyError, OSError) as exc:
        raise click.ClickException(f"the appliance's master key: {exc}") from None
    store = DocStore(settings.docs_db_path, master)
    try:
        yield store
    finally:
        store.close()


def _embedder(settings: Settings, name: str) -> tuple[Any, tuple[str, str]]:
    """The embedding model, in this process, checked against its manifest."""
    from appliance.engines.embed import EmbeddingEngine
    from appliance.registry import ManifestError, load_manifests, verify_model

    try:
        manifest = load_manifests(settings).get(name)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    if manifest is None or manifest.kind != "embedding" or manifest.tokenizer is None:
        raise click.ClickException(f"{name!r} is not an embedding model here")
    check = verify_model(manifest, settings.models_path)
    if not check.ok:
        raise click.ClickException(check.message + f" (appliance models fetch {name})")
    engine = EmbeddingEngine(
        settings.models_path / manifest.file,
        settings.models_path / manifest.tokenizer.file,
        threads=psutil.cpu_count(logical=False) or 1,
        max_input_tokens=manifest.context_length or 256,
    )
    return engine, (manifest.name, manifest.sha256)


def _embed(engine: Any) -> Any:
    def embed(texts: list[str]) -> Any:
        import numpy as np

        out = [engine.embed_texts(texts[i : i + 32]) for i in range(0, len(texts), 32)]
        return np.concatenate(out) if out else np.zeros((0, engine.dimensions), np.float32)

    return embed


@docs_group.command("add")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option("--collection", required=True, help="The collection (created if new).")
@click.option(
    "--embedding",
    default=None,
    help=f"Embedding model (default: the collection's, or {DEFAULT_EMBEDDING}).",
)
@click.option(
    "--max-chars",
    type=click.IntRange(100, 8000),
    default=800,
    show_default=True,
    help="Largest passage.",
)
@click.option(
    "--overlap",
    type=click.IntRange(0, 4000),
    default=120,
    show_default=True,
    help="Characters shared by neighbouring passages.",
)
@settings_options(PATH_SETTINGS)
@json_option
def docs_add(
    paths: tuple[Path, ...],
    collection: str,
    embedding: str | None,
    max_chars: int,
    overlap: int,
    settings: Settings,
    as_json: bool,
) -> None:
    """Add text, Markdown, HTML and PDF files (directories: their files) to COLLECTION:
    text cut into passages along headings and paragraphs, embedded, sealed; a changed
    file becomes a new version and its old passages are retired. Audited."""
    from appliance.docs.extract import ExtractError, kind_of
    from appliance.docs.store import DocsError

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and _supported(p))
        else:
            files.append(path)
    results = []
    with audit_store(settings) as audit, _store(settings) as store:
        stored = store.embedding()
        engine, model = _embedder(
            settings, embedding or (stored[0] if stored else DEFAULT_EMBEDDING)
        )
        try:
            embed = _embed(engine)
            with click.progressbar(
                files,
                label=f"adding to {collection}",
                file=sys.stderr,
                hidden=as_json,
            ) as bar:
                for path in bar:
                    try:
                        kind_of(path)
                        added = store.add(path, collection, embed, model, max_chars, overlap)
                    except (ExtractError, DocsError) as exc:
                        results.append(
                            {"source": str(path), "status": "refused", "reason": str(exc)}
                        )
                        continue
                    row = vars(added)
                    results.append(row)
                    if added.status != "unchanged":
                        record_action(
                            audit,
                            "docs.add",
                            {
                                k: row[k]
                                for k in (
                                    "collection",
                                    "source",
                                    "title",
                                    "sha256",
                                    "version",
                                    "passages",
                                    "status",
                                    "retired",
                                )
                            },
                        )
        finally:
            engine.close()
    if as_json:
        print_json(results)
    else:
        for r in results:
            if r["status"] == "refused":
                click.echo(f"refused  {r['source']}: {r['reason']}")
            else:
                click.echo(
                    f"{r['status']:12} {r['title'][:40]:40} v{r['version']} "
                    f"{r['passages']} passages  {r['source']}"
                )
    if any(r["status"] == "refused" for r in results):
        sys.exit(1)


def _supported(path: Path) -> bool:
    from appliance.docs.extract import ExtractError, kind_of

    try:
        kind_of(path)
    except ExtractError:
        return False
    return True


@docs_group.command("list")
@click.option("--collection", default=None, help="Only this collection.")
@click.option("--all-versions", is_flag=True, help="Retired versions too.")
@settings_options(PATH_SETTINGS)
@json_option
def docs_list(
    collection: str | None, all_versions: bool, settings: Settings, as_json: bool
) -> None:
    """The collections (who may read them) and their documents."""
    with _store(settings) as store:
        data = {
            "collections": store.collections(),
            "documents": store.documents(collection, all_versions),
            "embedding": store.embedding(),
        }
    if as_json:
        print_json(data)
        return
    for name, c in sorted(data["collections"].items()):
        roles = ", ".join(c["roles"]) if c["roles"] else "every role that may ask"
        click.echo(f"{name}: {c['documents']} documents; read by {roles}")
    for d in data["documents"]:
        state = f"retired {d['retired']}" if d["retired"] else "current"
        click.echo(
            f"  [{d['id']}] {d['collection']}/{d['title'][:50]} v{d['version']} "
            f"({d['kind']}, {d['passages']} passages, {state}) {d['source']}"
        )


@docs_group.command("remove")
@click.argument("collection")
@click.argument("document", required=False)
@settings_options(PATH_SETTINGS)
@json_option
def docs_remove(collection: str, document: str | None, settings: Settings, as_json: bool) -> None:
    """Retire DOCUMENT (its source path or id) from COLLECTION, or the whole collection's
    documents: no longer searched or cited; the rows stay for the audit. Audited."""
    with audit_store(settings) as audit, _store(settings) as store:
        record_action(audit, "docs.remove", {"collection": collection, "document": document})
        n = store.remove(collection, document)
    if as_json:
        print_json({"collection": collection, "document": document, "retired": n})
    else:
        click.echo(f"retired {n} document(s) from {collection}")
    if n == 0:
        sys.exit(1)


@docs_group.command("reindex")
@click.option("--embedding", default=DEFAULT_EMBEDDING, show_default=True, help="Embedding model.")
@settings_options(PATH_SETTINGS)
@json_option
def docs_reindex(embedding: str, settings: Settings, as_json: bool) -> None:
    """Embed every current passage again (after the embedding model changed). Audited."""
    with audit_store(settings) as audit, _store(settings) as store:
        engine, model = _embedder(settings, embedding)
        try:
            total = sum(d["passages"] for d in store.documents())
            with click.progressbar(
                length=total,
                label="reindexing",
                file=sys.stderr,
                hidden=as_json,
            ) as bar:
                n = store.reindex(_embed(engine), model, bar.update)
        finally:
            engine.close()
        record_action(audit, "docs.reindex", {"embedding": list(model), "passages": n})
    if as_json:
        print_json({"passages": n, "embedding": list(model)})
    else:
        click.echo(f"{n} passages embedded with {model[0]}")


@docs_group.command("access")
@click.argument("collection")
@click.option(
    "--role", "roles", multiple=True, help="A role that may read it; repeat. None: every role."
)
@settings_options(PATH_SETTINGS)
@json_option
def docs_access(collection: str, roles: tuple[str, ...], settings: Settings, as_json: bool) -> None:
    """Which roles may read COLLECTION (retrieval never gives a passage to another);
    without --role, every role that may ask questions. Audited."""
    from appliance.auth.store import ROLES
    from appliance.docs.store import DocsError

    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise click.ClickException(f"unknown role(s) {', '.join(bad)}; roles: {', '.join(ROLES)}")
    with audit_store(settings) as audit, _store(settings) as store:
        record_action(
            audit, "docs.access", {"collection": collection, "roles": list(roles) or None}
        )
        try:
            store.set_roles(collection, list(roles) or None)
        except DocsError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        print_json({"collection": collection, "roles": list(roles) or None})
    else:
        click.echo(f"{collection}: read by {', '.join(roles) or 'every role that may ask'}")


@docs_group.command("calibrate")
@click.argument("collection")
@click.option(
    "--suite",
    "suite_path",
    required=True,
    type=click.Path(path_type=Path, exists=True),
    help="Questions tagged answerable yes/no (expected: a phrase of the passage).",
)
@server_options
@settings_options(SERVER_SETTINGS)
@json_option
def docs_calibrate(
    collection: str,
    suite_path: Path,
    token: str | None,
    url: str | None,
    settings: Settings,
    as_json: bool,
) -> None:
    """Measure COLLECTION's retrieval on a suite through the running appliance
    (/v1/retrieve): the fusion weight of the embeddings that finds the most answerable
    questions' passages, and the relevance threshold below which a grounded answer says
    no source was found. Both kept for the collection; audited."""
    from appliance.docs import calibrate as cal
    from appliance.docs.store import DocsError
    from appliance.evals.client import ApiFailure, connect
    from appliance.evals.graders import SuiteError
    from appliance.evals.suite import load_suite

    try:
        suite = load_suite(suite_path)
    except SuiteError as exc:
        raise click.ClickException(str(exc)) from None
    if suite.kind != "text" or not suite.cases:
        raise click.ClickException(f"{suite_path}: questions are needed (a text suite)")
    with audit_store(settings) as audit, _store(settings) as store:
        try:
            with connect(settings, f"docs calibrate {collection}", token, url) as client:
                recalls = {w: cal.recall(client, suite, collection, w) for w in cal.WEIGHTS}
                weight = cal.best_weight(recalls)
                measured = cal.observe(client, suite, collection, weight=weight)
        except (ApiFailure, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        chosen, accuracy = cal.threshold(measured)
        result = {
            "collection": collection,
            "suite": str(suite.path),
            "suite_sha256": suite.sha256,
            "vector_weight": weight,
            "recall_at_k_by_weight": {str(w): round(r, 4) for w, r in recalls.items()},
            **cal.summary(measured, chosen, accuracy),
        }
        record_action(audit, "docs.calibrate", result)
        try:
            store.set_calibration(collection, chosen, weight)
        except DocsError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        print_json(result)
        return
    click.echo(
        f"{collection}: min similarity {chosen:.3f}, vector weight {weight}; on "
        f"{result['cases']} questions "
        f"{accuracy:.0%} sorted right (answerable kept {result['answerable_kept']}, "
        f"unanswerable refused {result['unanswerable_refused']}, recall@5 {result['recall_at_k']})"
    )
