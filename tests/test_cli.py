"""sink.cli: `run --help` says how the sink is configured and how it exits; a configuration
error reads the way LOG_FORMAT asks, for the sink and for sink-dlq."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dev import testkit
from sink.cli import main
from sink.settings import Settings


def test_run_help_lists_every_setting_with_its_default_and_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out

    listed = {line.split("=", 1)[0].strip() for line in out.splitlines() if line.startswith("  ") and "=" in line}
    assert listed == {name.upper() for name in Settings.model_fields}
    assert "  BATCH_SIZE=2500\n" in out and "  KAFKA_TRANSACTIONAL=true\n" in out
    assert "  TIMESCALE_PASSWORD=(secret)\n" in out and "ts_password" not in out
    codes = [line.split()[0] for line in out.split("exit codes:", 1)[1].splitlines() if line.strip()]
    assert codes == ["0", "1", "2", "75"]


def invalid_config(command: list[str], log_format: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "TIMESCALE_", "LOG_", "BATCH_"))}
    env["BATCH_SIZE"] = "0"
    if log_format is not None:
        env["LOG_FORMAT"] = log_format
    return subprocess.run([sys.executable, "-m", *command], env=env, cwd=testkit.ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("command", "log_on"), [(["sink", "run"], "stdout"), (["dlq", "inspect"], "stderr")])
def test_a_configuration_error_is_logged_in_the_log_format_asked_for(command: list[str], log_on: str) -> None:
    console = invalid_config(command, "console")
    default = invalid_config(command, None)

    assert console.returncode == default.returncode == 2
    [line] = [x for x in getattr(console, log_on).splitlines() if "config_invalid" in x]
    assert not line.lstrip().startswith("{") and "BATCH_SIZE" in line
    [line] = [x for x in getattr(default, log_on).splitlines() if "config_invalid" in x]
    assert json.loads(line)["event"] == "config_invalid"
