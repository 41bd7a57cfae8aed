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


def test_code_the_docs_name_exists() -> None:
    # `sink.pipeline.Pipeline._complete`-style references in the README and docs/ must resolve.
    import importlib
    import re

    texts = [README, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
    refs = {m for text in texts for m in re.findall(r"`((?:sink|dlq)\.[A-Za-z_][\w.]*)`", text)
            if (ROOT / m.split(".")[0] / f"{m.split('.')[1]}.py").exists()}  # not file names like sink.log.1.gz
    assert refs, "no code references found: the pattern is wrong"
    missing = []
    for ref in sorted(refs):
        parts = ref.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj: object = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(ref)
            break
        else:
            missing.append(ref)
    assert missing == []
