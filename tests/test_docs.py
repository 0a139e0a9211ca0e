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
