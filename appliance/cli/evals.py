"""`appliance eval run`: a suite through the running appliance, per model; and
`appliance models promote` / `rollback`: the champion behind a served name, moved
only when its eval allows it. Every run, promotion, refusal and rollback is audited."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click

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
from appliance.cli.models import models as models_group
from appliance.config import Settings


@main.group("eval")
def eval_group() -> None:
    """Eval suites: score models on the site's own questions."""


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _load(path: Path) -> Any:
    from appliance.evals.graders import SuiteError
    from appliance.evals.suite import load_suite

    try:
        return load_suite(path)
    except SuiteError as exc:
        raise click.ClickException(str(exc)) from None


def run_and_record(
    settings: Settings,
    store: Any,
    client: Any,
    suite: Any,
    models: list[str],
    concurrency: int,
    quiet: bool,
) -> tuple[dict[str, Any], Path]:
    """Run, save the report, audit the run (before anyone reads the result)."""
    from appliance.evals import runner

    total = len(models) * (len(suite.cases) or len(suite.tensor_cases))
    if quiet:
        report = runner.run(client, suite, models, concurrency)
    else:
        with click.progressbar(length=total, label=f"eval {suite.name}", file=sys.stderr) as bar:
            report = runner.run(client, suite, models, concurrency, bar.update)
    where, sha = runner.save(report, settings.evals_path)
    record_action(store, "eval.run", runner.audit_summary(report, sha, where))
    return report, where


@eval_group.command("run")
@click.argument("suite_path", metavar="SUITE", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    help="A model, specialist, route or served name; repeat to compare.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Cases in flight per model.",
)
@server_options
@settings_options(SERVER_SETTINGS)
@json_option
def eval_run(
    suite_path: Path,
    models: tuple[str, ...],
    concurrency: int,
    token: str | None,
    url: str | None,
    settings: Settings,
    as_json: bool,
) -> None:
    """Send SUITE's cases to each --model through the running appliance (its tokens,
    audit log and batcher), grade the answers, and write report.json and report.html
    under STATE_DIR/evals/RUN_ID; the run is an audit record with the hashes and scores."""
    from appliance.evals.client import ApiFailure, connect

    suite = _load(suite_path)
    with audit_store(settings) as store:
        try:
            with connect(settings, f"eval {suite.name}", token, url) as client:
                report, where = run_and_record(
                    settings, store, client, suite, list(models), concurrency, as_json
                )
        except ApiFailure as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        print_json({**report, "report_dir": str(where)})
        return
    click.echo(f"suite {suite.name} ({suite.sha256[:12]}), {report['suite']['cases']} cases")
    click.echo(
        f"{'model':28} {'score':>6} {'95% CI':>15} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'tok/s':>7} {'peak MiB':>9}"
    )
    for m in report["models"]:
        lat = m["latency_ms"]
        ci = f"{_fmt(m['ci95'][0], '.2f')}-{_fmt(m['ci95'][1], '.2f')}"
        click.echo(
            f"{m['model']:28} {_fmt(m['score']):>6} {ci:>15} {_fmt(lat['p50'], '.0f'):>8} "
            f"{_fmt(lat['p95'], '.0f'):>8} {_fmt(m['tokens_per_second'], '.1f'):>7} "
            f"{_fmt(m['peak_memory_mb'], '.0f'):>9}"
        )
        for tag, groups in m["tags"].items():
            parts = ", ".join(
                f"{v} {_fmt(g['score'], '.2f')} ({g['cases']})" for v, g in groups.items()
            )
            click.echo(f"{'':4}{tag}: {parts}")
    click.echo(f"report: {where / 'report.html'}")


def _entry_for(
    settings: Settings, store: Any, client: Any, suite: Any, model: str, rerun: bool
) -> dict[str, Any]:
    """The model's result on the suite: a saved run of it as it is now, or a new one."""
    from appliance.evals import runner

    sha, _ = runner.identity(client, model)
    if not rerun:
        found = runner.latest(settings.evals_path, suite.sha256, model, sha)
        if found is not None:
            return found
    report, _ = run_and_record(settings, store, client, suite, [model], 1, True)
    entry: dict[str, Any] = report["models"][0]
    return entry


@models_group.command("promote")
@click.argument("name")
@click.option("--to", "candidate", required=True, help="The model to serve NAME from now on.")
@click.option(
    "--suite",
    "suite_path",
    required=True,
    type=click.Path(path_type=Path, exists=True),
    help="The eval suite that decides.",
)
@click.option(
    "--rerun", is_flag=True, help="Run the eval again even if a run of these hashes is saved."
)
@server_options
@settings_options(SERVER_SETTINGS)
@json_option
def models_promote(
    name: str,
    candidate: str,
    suite_path: Path,
    rerun: bool,
    token: str | None,
    url: str | None,
    settings: Settings,
    as_json: bool,
) -> None:
    """Serve NAME from CANDIDATE (clients keep sending NAME), if CANDIDATE's eval on
    SUITE reaches the suite's threshold and is no worse than the champion's by more
    than the suite's margin, overall and in every tagged group. Refused with the
    numbers otherwise. Uses a saved run of the same suite and model hashes, or runs it."""
    from appliance.evals import gate
    from appliance.evals.client import ApiFailure, connect
    from appliance.registry import ManifestError, load_manifests
    from appliance.routing.spec import RouteTable
    from appliance.serving.aliases import NAME, AliasError, AliasTable

    if not NAME.match(name):
        raise click.ClickException(f"a served name must match {NAME.pattern}: {name!r}")
    suite = _load(suite_path)
    try:
        manifests = load_manifests(settings)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    if name in manifests:
        raise click.ClickException(f"{name!r} is a model's own name; a served name must be another")
    target = manifests.get(candidate)
    if target is None or target.kind not in ("chat", "specialist"):
        what = "not a model" if target is None else f"a model of kind {target.kind}"
        raise click.ClickException(
            f"{candidate!r} is {what}: a served name points to a chat model or a specialist"
        )
    if RouteTable(settings.routes_path).get(name) is not None:
        raise click.ClickException(f"{name!r} is a route's name; a served name must be another")
    aliases = AliasTable(settings.aliases_path)
    champion = aliases.champion(name)
    if champion == candidate:
        raise click.ClickException(f"{candidate!r} already serves {name!r}")
    with audit_store(settings) as store:
        try:
            with connect(settings, f"promote {name}", token, url) as client:
                theirs = _entry_for(settings, store, client, suite, candidate, rerun)
                ours = (
                    _entry_for(settings, store, client, suite, champion, rerun)
                    if champion
                    else None
                )
        except ApiFailure as exc:
            raise click.ClickException(str(exc)) from None
        suite_info = {
            "name": suite.name,
            "sha256": suite.sha256,
            "threshold": suite.settings.threshold,
            "margin": suite.settings.margin,
        }
        problems = gate.judge(suite_info, theirs, ours)
        evidence = {
            "suite": suite_info,
            "candidate": {"model": candidate, "sha256": theirs["sha256"], "score": theirs["score"]},
            "champion": {"model": champion, "sha256": ours["sha256"], "score": ours["score"]}
            if ours
            else None,
        }
        if problems:
            record_action(
                store, "models.promote.refused", {"name": name, **evidence, "problems": problems}
            )
            if as_json:
                print_json({"promoted": False, "name": name, **evidence, "problems": problems})
            raise click.ClickException(
                f"{candidate} is not promoted to {name}: " + "; ".join(problems)
            )
        record_action(store, "models.promote", {"name": name, **evidence})
        try:
            aliases.promote(name, candidate, evidence)
        except AliasError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        print_json({"promoted": True, "name": name, **evidence})
        return
    was = f" (was {champion}, {ours['score']:.3f})" if ours else ""
    click.echo(f"{name} -> {candidate}: {theirs['score']:.3f} on {suite.name}{was}")


@models_group.command("rollback")
@click.argument("name")
@settings_options(PATH_SETTINGS)
@json_option
def models_rollback(name: str, settings: Settings, as_json: bool) -> None:
    """Serve NAME from the champion it had before the last promotion; audited."""
    from appliance.serving.aliases import AliasError, AliasTable

    aliases = AliasTable(settings.aliases_path)
    with audit_store(settings) as store:
        current = aliases.champion(name)
        try:
            entry = aliases.all().get(name) or {}
            if not entry.get("history"):
                raise AliasError(f"{name!r} has no earlier champion to go back to")
            previous = entry["history"][-1]["champion"]
            record_action(store, "models.rollback", {"name": name, "from": current, "to": previous})
            aliases.rollback(name)
        except AliasError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        print_json({"name": name, "from": current, "to": previous})
        return
    click.echo(f"{name} -> {previous} (was {current})")


@models_group.command("aliases")
@settings_options(PATH_SETTINGS)
@json_option
def models_aliases(settings: Settings, as_json: bool) -> None:
    """The served names and the champion behind each."""
    from appliance.serving.aliases import AliasTable

    data = AliasTable(settings.aliases_path).all()
    if as_json:
        print_json(data)
        return
    for name, entry in sorted(data.items()):
        click.echo(f"{name:20} -> {entry['champion']:28} since {entry.get('since')}")
