"""The event catalogue (sink.logs.EVENTS) agrees with the code, the README, docs/logging.md and --help."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from sink import logsearch
from sink.errors import retry_log_fields
from sink.logs import EVENTS, FIELDS

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("sink", "dlq")
# structlog's bound-logger methods (sync and async); the first positional argument is the event.
LOG_METHODS = frozenset(
    name for base in ("debug", "info", "warning", "warn", "error", "critical", "exception", "msg")
    for name in (base, f"a{base}")
)
# Only snake_case literals are events: this skips `parser.error("a sentence")` and the like.
EVENT_NAME = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
# Fields every line has: added by the logging processors, not by the calls.
PROCESSOR_FIELDS = frozenset({"timestamp", "level", "event", "logger"})


def log_calls() -> list[tuple[str, ast.Call]]:
    """("path:line", call) of every ``<logger>.<method>("event", ...)`` call in SOURCE_DIRS."""
    calls = []
    for directory in SOURCE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
                if _event_of(node):
                    assert isinstance(node, ast.Call)
                    calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", node))
    return calls


def emitted_events() -> dict[str, list[str]]:
    """event name -> ["path:line", ...] of every log call."""
    found: dict[str, list[str]] = {}
    for where, call in log_calls():
        found.setdefault(str(_event_of(call)), []).append(where)
    return found


def _event_of(node: ast.AST) -> str | None:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOG_METHODS):
        return None
    first = node.args[0] if node.args else None
    if isinstance(first, ast.Constant) and isinstance(first.value, str) and EVENT_NAME.match(first.value):
        return first.value
    return None


def backticked(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def readme_logging_section() -> str:
    """From the README's ``Logging`` heading (any level) to the next heading of that level or higher."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    for i, text in enumerate(lines):
        if m := re.match(r"^(#+)\s+Logging\b", text, re.IGNORECASE):
            level = len(m[1])
            end = next(
                (j for j in range(i + 1, len(lines)) if re.match(rf"^#{{1,{level}}}\s", lines[j])), len(lines)
            )
            return "\n".join(lines[i:end])
    pytest.fail("README.md has no 'Logging' section (a heading like '## Logging')")


def test_event_names_are_snake_case() -> None:
    assert [name for name in EVENTS if not EVENT_NAME.match(name)] == []


def test_every_emitted_event_is_in_the_catalogue() -> None:
    unknown = {name: where for name, where in emitted_events().items() if name not in EVENTS}
    assert not unknown, f"emitted but not in sink.logs.EVENTS (add them there, with a description): {unknown}"


def test_every_catalogued_event_is_emitted() -> None:
    never = sorted(set(EVENTS) - emitted_events().keys())
    assert not never, f"in sink.logs.EVENTS but emitted nowhere in {SOURCE_DIRS} (emit or remove): {never}"


def test_every_catalogued_field_is_logged_somewhere() -> None:
    # An operator searches for these (--where KEY=VALUE): a field no line carries finds nothing.
    keywords = {kw.arg for _, call in log_calls() for kw in call.keywords if kw.arg}
    retrying = set(retry_log_fields("db_write", SimpleNamespace(outcome=None, next_action=None,  # type: ignore[arg-type]
                                                                attempt_number=1)))
    never = sorted(set(FIELDS) - keywords - retrying - PROCESSOR_FIELDS)
    assert not never, f"in sink.logs.FIELDS but no log call passes them: {never}"


def test_readme_logging_section_points_to_the_events_instead_of_repeating_them() -> None:
    section = readme_logging_section()
    assert "docs/logging.md#events" in section
    repeated = sorted(set(EVENTS) & backticked(section))
    assert len(repeated) <= 3, f"README.md repeats docs/logging.md's events table: {repeated}"


def test_logging_doc_lists_every_event_and_field() -> None:
    documented = backticked((ROOT / "docs" / "logging.md").read_text(encoding="utf-8"))
    missing = sorted((set(EVENTS) | set(FIELDS)) - documented)
    assert not missing, f"docs/logging.md does not list these events/fields (as `name`): {missing}"


def test_search_help_lists_every_event(capsys: pytest.CaptureFixture[str]) -> None:
    assert logsearch.main(["--help"]) == 0
    block = capsys.readouterr().out.split("events (sink.logs.EVENTS):\n", 1)[1].split("\n\n", 1)[0]
    listed = {m[1] for m in re.finditer(r"^  ([a-z0-9_]+)\s", block, re.MULTILINE)}
    assert listed == set(EVENTS)
