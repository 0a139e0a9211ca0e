"""The README says what the code does: the settings table and the two commands."""

from pathlib import Path

from appliance.config import docs_markdown

REPO = Path(__file__).resolve().parent.parent


def test_readme_settings_table_is_generated_from_the_schema() -> None:
    assert docs_markdown() in (REPO / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    assert "./scripts/test" in readme and "./scripts/run" in readme
    assert "./scripts/test" in (REPO / ".ci" / "run").read_text()


STALE = (
    "when tensor models come",
    "anonymous until sign-in exists",
    "later the audit database and keys",
)


def test_no_stale_phrase_in_the_readme_or_any_help() -> None:
    from click.testing import CliRunner

    from appliance.cli import main

    readme = (REPO / "README.md").read_text()
    helps = CliRunner().invoke(main, ["serve", "--help"]).output
    for phrase in STALE:
        assert phrase not in readme and phrase not in helps, phrase
    assert "--state-dir" in helps


def test_every_command_the_readme_shows_exists() -> None:
    """`appliance GROUP COMMAND` in the README's examples is a real command, and the
    README says where the command is (.venv/bin/appliance)."""
    import re

    import click

    from appliance.cli import main

    readme = (REPO / "README.md").read_text()
    assert ".venv/bin/appliance" in readme and 'export PATH="$PWD/.venv/bin:$PATH"' in readme
    # Commands: a line of a fenced block, or an `inline` span, that starts with one.
    command = r"(?:\.venv/bin/)?appliance ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?"
    shown = set()
    for block in re.findall(r"```.*?```", readme, re.S):
        shown |= set(re.findall(r"^\s*" + command, block, re.MULTILINE))
    shown |= set(re.findall("`" + command, readme))
    assert len(shown) > 20
    ctx = click.Context(main)
    for group, sub in shown:
        command = main.get_command(ctx, group)
        assert command is not None, f"appliance {group}"
        if isinstance(command, click.Group) and sub:
            assert command.get_command(ctx, sub) is not None, f"appliance {group} {sub}"
