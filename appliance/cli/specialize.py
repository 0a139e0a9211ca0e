"""`appliance specialize`: train a LoRA adapter on the box and install it, with a
specialist that serves it (needs the training extra: pip install '.[train]')."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

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


@main.command()
@click.option("--base", required=True, help="The chat model to specialise (its name).")
@click.option(
    "--data",
    required=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help='Chat examples, OpenAI fine-tuning JSONL: {"messages": [...]} per line.',
)
@click.option("--name", required=True, help="The specialist's name (its adapter: NAME-lora).")
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--rank", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--alpha", default=16.0, show_default=True, type=click.FloatRange(0.1, 1e4))
@click.option("--learning-rate", default=2e-3, show_default=True, type=click.FloatRange(1e-6, 1))
@click.option(
    "--targets",
    default="attn_q,attn_v",
    show_default=True,
    help="Projections that get an adapter: attn_q, attn_k, attn_v, attn_output, ffn_gate, "
    "ffn_up, ffn_down.",
)
@click.option("--held-out", default=0.2, show_default=True, type=click.FloatRange(0.05, 0.5))
@click.option(
    "--max-memory-mb",
    default=4096,
    show_default=True,
    type=click.IntRange(256),
    help="Training stops (checkpoint kept) if the process holds more.",
)
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint of NAME.")
@click.option("--role", "roles", multiple=True, help="A role that may use it (repeatable).")
@settings_options(PATH_SETTINGS)
@json_option
def specialize(
    base: str,
    data: Path,
    name: str,
    epochs: int,
    rank: int,
    alpha: float,
    learning_rate: float,
    targets: str,
    held_out: float,
    max_memory_mb: int,
    resume: bool,
    roles: tuple[str, ...],
    settings: Settings,
    as_json: bool,
) -> None:
    """Train a LoRA adapter for BASE on DATA, score it on held-out examples before and
    after, and install it with a specialist NAME that serves it."""
    try:
        from appliance.training.specialize import (
            TrainConfig,
            TrainingError,
            describe,
            read_examples,
            train,
        )
    except ImportError as exc:  # the serving install has no torch
        raise click.ClickException(
            f"training needs the training extra ({exc}): pip install '.[train]'"
        ) from None
    from appliance.adapters import AdapterRefused, install_adapter, write_specialist
    from appliance.auth.store import ROLES

    unknown = sorted(set(roles) - set(ROLES))
    if unknown:  # refused before hours of training, not after
        raise click.ClickException(f"unknown role(s) {unknown}; roles: {', '.join(ROLES)}")
    config = TrainConfig(
        rank=rank,
        alpha=alpha,
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
        epochs=epochs,
        learning_rate=learning_rate,
        held_out=held_out,
        max_memory_mb=max_memory_mb,
    )
    with audit_store(settings) as store:
        bar = click.progressbar(
            length=1, label=f"training {name}", file=sys.stderr, show_eta=True, show_pos=True
        )

        def progress(step: int, total: int) -> None:
            if as_json:
                return
            bar.length = total
            bar.update(step - bar.pos)

        try:
            result = train(settings, data, base, name, config, resume, progress)
        except TrainingError as exc:  # a run that stopped is an event too
            record_action(
                store, "specialize stopped", {"name": name, "base": base, "reason": str(exc)}
            )
            raise click.ClickException(str(exc)) from None
        finally:
            if not as_json:
                bar.render_finish()
        provenance = describe(result)
        kept = settings.state_dir / "training" / name / "data.jsonl"
        system = _common_system_prompt(read_examples(kept))
        try:
            adapter = install_adapter(
                settings,
                Path(result.adapter),
                f"{name}-lora",
                base,
                description=f"made on this appliance for specialist {name}",
                provenance=provenance,
            )
            specialist = write_specialist(
                settings,
                name,
                base,
                [(adapter.name, 1.0)],
                system_prompt=system,
                roles=list(roles) or None,
                description=f"{base} with {adapter.name}, trained here on {result.trained} "
                f"examples (held-out exact match {result.held_out_before:.2f} -> "
                f"{result.held_out_after:.2f})",
            )
        except AdapterRefused as exc:
            raise click.ClickException(str(exc)) from None
        details = {
            "name": specialist.name,
            "adapter": adapter.name,
            "adapter_sha256": adapter.sha256,
            "base": base,
            "training_data_sha256": result.data_sha256,
            "held_out_before": result.held_out_before,
            "held_out_after": result.held_out_after,
            "seconds": result.seconds,
        }
        record_action(store, "specialize", details)
    report = {
        **details,
        "examples": result.examples,
        "held_out": result.held_out,
        "steps": result.steps,
        "peak_rss_mb": result.peak_rss_mb,
        "config": result.config,
    }
    if as_json:
        print_json(report)
        return
    click.echo(
        f"specialist {name}: held-out exact match {result.held_out_before:.2f} (base) -> "
        f"{result.held_out_after:.2f} on {result.held_out} examples; trained on "
        f"{result.trained} in {result.seconds:.0f} s ({result.steps} steps, peak "
        f"{result.peak_rss_mb} MiB)"
    )
    click.echo(f"adapter {adapter.name}: sha256 {adapter.sha256}")
    click.echo(f"serve it with the request's model field: {name}")


def _common_system_prompt(examples: Sequence[object]) -> str | None:
    """The system message every example opens with, if they share one: the specialist
    then gives it to every request, as the examples had it."""
    first = set()
    for example in examples:
        messages = getattr(example, "messages", [])
        first.add(messages[0]["content"] if messages and messages[0]["role"] == "system" else None)
    only = first.pop() if len(first) == 1 else None
    return only if isinstance(only, str) else None
