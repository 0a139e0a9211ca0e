"""`appliance route`: the routes (a name that answers with a specialist, the
generalist or a referral), and their calibration from an eval suite."""

from __future__ import annotations

from pathlib import Path

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
from appliance.config import Settings


@main.group("route")
def route_group() -> None:
    """Specialist-first routes: list them, calibrate their thresholds."""


@route_group.command("list")
@settings_options(PATH_SETTINGS)
@json_option
def route_list(settings: Settings, as_json: bool) -> None:
    """The routes in STATE_DIR/routes: their models and calibration."""
    from appliance.routing.spec import RouteTable

    table = RouteTable(settings.routes_path)
    rows = [route.public() for route in table.routes().values()]
    if as_json:
        print_json({"routes": rows, "problems": table.problems})
        return
    for r in rows:
        cal = r["calibration"]
        state = (
            f"calibrated on {Path(cal['suite']).name} ({cal['suite_sha256'][:12]})"
            if cal
            else "not calibrated"
        )
        click.echo(f"{r['name']:20} {', '.join(r['specialists'])} -> {r['generalist']}  [{state}]")
    for name, problem in table.problems.items():
        click.echo(f"{name:20} not served: {problem}", err=True)


@route_group.command("calibrate")
@click.argument("route")
@click.option(
    "--suite",
    "suite_path",
    required=True,
    type=click.Path(path_type=Path, exists=True),
    help="An eval suite whose cases carry a tag 'domain' (the specialist, or other).",
)
@click.option(
    "--target-error",
    type=click.FloatRange(0.0, 1.0),
    default=0.05,
    show_default=True,
    help="Most wrong answers allowed among those not referred.",
)
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=None, help="Per answer.")
@server_options
@settings_options(SERVER_SETTINGS)
@json_option
def route_calibrate(
    route: str,
    suite_path: Path,
    target_error: float,
    max_tokens: int | None,
    token: str | None,
    url: str | None,
    settings: Settings,
    as_json: bool,
) -> None:
    """Measure ROUTE's thresholds on a suite through the running appliance, and write
    them (with the suite's hash) beside the route's config; audited."""
    from appliance.evals.client import ApiFailure, connect
    from appliance.evals.graders import SuiteError
    from appliance.evals.suite import load_suite
    from appliance.routing import calibrate as cal
    from appliance.routing.spec import RouteTable, write_calibration

    table = RouteTable(settings.routes_path)
    spec = table.get(route)
    if spec is None:
        why = table.problems.get(route) or f"no route {route!r} in {settings.routes_path}"
        raise click.ClickException(why)
    try:
        suite = load_suite(suite_path)
    except SuiteError as exc:
        raise click.ClickException(str(exc)) from None
    if suite.kind != "text" or not suite.cases:
        raise click.ClickException(
            f"{suite_path}: a route is calibrated on questions (a text suite with cases)"
        )
    limit = max_tokens or suite.settings.max_tokens
    with audit_store(settings) as store:
        try:
            with connect(settings, f"route calibrate {route}", token, url) as client:
                observations = cal.observe(client, spec, suite, limit)
        except ApiFailure as exc:
            raise click.ClickException(str(exc)) from None
        calibration = cal.calibrate(observations, spec, suite, target_error)
        now = RouteTable(settings.routes_path).get(route)
        if now is None or now.sha256 != spec.sha256:
            raise click.ClickException(
                f"{spec.path} changed while it was calibrated; calibrate it again"
            )
        record_action(
            store,
            "route.calibrate",
            {
                "route": route,
                "config_sha256": spec.sha256,
                **{k: v for k, v in calibration.public().items() if k != "measured"},
                "measured": {k: v for k, v in calibration.measured.items() if k != "observations"},
            },
        )
        path = write_calibration(spec, calibration)
    result = calibration.public()
    if as_json:
        print_json({"route": route, "written": str(path), **result})
        return
    m = calibration.measured
    click.echo(
        f"route {route}: similarity >= {calibration.similarity:.3f}, specialist confidence >= "
        f"{calibration.specialist_confidence:.3f}, generalist confidence >= "
        f"{calibration.generalist_confidence:.3f}"
    )
    click.echo(
        f"on {m['cases']} cases of {suite.name}: routed right {m['routing_accuracy']:.0%}, "
        f"correct {m['accuracy']:.0%}, wrong among answered {m['wrong_among_answered']:.0%} "
        f"(target {target_error:.0%}), referred {m['referral_rate']:.0%}"
    )
    if m["refers_everything"]:
        click.echo("no setting meets the target: every question is referred", err=True)
    click.echo(f"written: {path}")
