"""The README's configuration table and commands match the code."""

from __future__ import annotations

from pathlib import Path

from sink.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table_and_nothing_else() -> None:
    table = {line.split("|")[1].strip().strip("`") for line in README.splitlines()
             if line.startswith("| `") and line.count("|") >= 4}
    fields = {name.upper() for name in Settings.model_fields}
    assert fields == table, (f"undocumented settings: {sorted(fields - table)}; "
                             f"documented but not settings: {sorted(table - fields)}")


def test_ci_runs_the_readme_test_command() -> None:
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == ["dev/test"]
    assert "\n    dev/test\n" in README and "\n    dev/demo\n" in README
