"""compose.yaml and the Dockerfile, checked as files (no Docker engine runs here)."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from sink.settings import Settings
from sink.timescale import MIN_TIMESCALEDB
from sink.topics import DLQ_HEADROOM_BYTES, KAFKA_DEFAULT_MAX_MESSAGE_BYTES
from tests.test_alert_rules import promtool

ROOT = Path(__file__).resolve().parent.parent

# The spec's "Environment Variables" block, less its user and password: the sink runs as the
# runtime role, not as the database's superuser (docs/security.md).
SPEC_ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": "kafka:29092",
    "KAFKA_INPUT_TOPIC": "decoded_iot_data",
    "TIMESCALE_HOST": "timescaledb",
    "TIMESCALE_DB": "timeseries",
    "TIMESCALE_PORT": "5432",
    # The spec's names with the service's throughput defaults (README, "Configuration").
    "BATCH_SIZE": "2500",
    "BATCH_TIMEOUT": "1",
}
_DEFAULTED = re.compile(r"^\$\{([A-Z_][A-Z0-9_]*):-(.*)\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(compose["services"])


def env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as compose would pass it with nothing set on the host."""
    raw = service.get("environment") or {}
    assert isinstance(raw, dict), "environment is written as a mapping"
    out = {}
    for key, value in raw.items():
        text = str(value)
        match = _DEFAULTED.match(text)
        out[str(key)] = match.group(2) if match else text
        assert "$" not in out[str(key)], f"{key}: only ${{VAR:-default}} interpolation is used"
    return out


def depends(service: dict[str, Any]) -> dict[str, str]:
    return {name: spec["condition"] for name, spec in service.get("depends_on", {}).items()}


def test_compose_has_the_pipeline_services(services: dict[str, Any]) -> None:
    assert set(services) == {"kafka", "timescaledb", "topics", "migrate", "sink", "demo", "prometheus", "grafana"}


def test_kafka_is_the_official_image_as_a_single_kraft_node(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    kafka_env = env(kafka)

    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", kafka["image"])
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:29093"
    assert "INTERNAL://kafka:29092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert not any("ZOOKEEPER" in key for key in kafka_env)
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])


def test_timescaledb_is_pinned_to_the_release_the_suite_verified(services: dict[str, Any]) -> None:
    db = services["timescaledb"]
    match = re.fullmatch(r"timescale/timescaledb:(\d+)\.(\d+)\.(\d+)-pg15", db["image"])

    assert match, db["image"]
    assert tuple(int(x) for x in match.groups()) >= MIN_TIMESCALEDB
    assert {k: v for k, v in env(db).items() if k.startswith("POSTGRES_")} == {
        "POSTGRES_DB": "timeseries", "POSTGRES_USER": "ts_user", "POSTGRES_PASSWORD": "ts_password"}
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])


def test_topics_job_creates_the_input_and_dlq_topics_once_kafka_is_healthy(services: dict[str, Any]) -> None:
    job = services["topics"]
    script = " ".join(job["command"])

    assert job["image"] == services["kafka"]["image"]
    assert depends(job) == {"kafka": "service_healthy"}
    assert job["restart"] == "no"
    for topic in ("decoded_iot_data", "decoded_iot_data.dlq"):
        assert re.search(rf"--topic {re.escape(topic)} --partitions \d+ ", script), topic
    assert script.count("/opt/kafka/bin/kafka-topics.sh --bootstrap-server kafka:29092 --create --if-not-exists") == 2
    # As the sink would create it: the input's largest record plus the failure headers fit.
    dlq_max = KAFKA_DEFAULT_MAX_MESSAGE_BYTES + DLQ_HEADROOM_BYTES
    assert re.search(rf"--topic decoded_iot_data\.dlq [^&]*--config max\.message\.bytes={dlq_max}\b", script)


def test_sink_builds_here_restarts_and_waits_for_healthy_dependencies(services: dict[str, Any]) -> None:
    sink = services["sink"]

    assert sink["build"] == "."
    assert sink["restart"] == "unless-stopped"
    assert "container_name" not in sink, "a fixed name breaks `docker compose up --scale sink=N`"
    assert "ports" not in sink, "a fixed host port breaks scaling"
    assert depends(sink) == {
        "kafka": "service_healthy",
        "timescaledb": "service_healthy",
        "topics": "service_completed_successfully",
        "migrate": "service_completed_successfully",
    }
    probe = " ".join(sink["healthcheck"]["test"])
    assert "urllib.request.urlopen" in probe
    assert re.search(r"/(readyz|healthz)'", probe)


def test_sink_env_uses_settings_names_and_the_spec_values(services: dict[str, Any]) -> None:
    sink_env = env(services["sink"])
    known = {name.upper() for name in Settings.model_fields}

    assert set(sink_env) <= known, f"not settings: {sorted(set(sink_env) - known)}"
    assert {k: sink_env.get(k) for k in SPEC_ENV} == SPEC_ENV
    assert sink_env["TIMESCALE_HOST"] in services and sink_env["KAFKA_BOOTSTRAP_SERVERS"].startswith("kafka:")
    # The values validate as they would in the container.
    settings = Settings(**{k.lower(): v for k, v in sink_env.items()})
    assert settings.timescaledb_required is True
    assert settings.metrics_port == 9108


def test_demo_profile_runs_the_demo_producer(services: dict[str, Any]) -> None:
    demo = services["demo"]

    assert demo["profiles"] == ["demo"]
    assert demo["command"] == ["demo", "--count", "10000"]
    assert demo["build"] == "."
    assert depends(demo) == {"topics": "service_completed_successfully"}
    assert set(env(demo)) <= {name.upper() for name in Settings.model_fields}


def test_every_dependency_exists_and_healthy_ones_have_a_healthcheck(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for dep, condition in depends(service).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert condition in {"service_healthy", "service_completed_successfully", "service_started"}
            if condition == "service_healthy":
                assert "test" in services[dep].get("healthcheck", {}), f"{dep} has no healthcheck"


# --------------------------------------------------------------------------- PostgreSQL roles


ROLES_SCRIPT = ROOT / "deploy" / "postgres" / "100-sink-roles.sh"


def role_script_sets() -> dict[str, str]:
    """The psql variables 100-sink-roles.sh gives sink-roles.sql (``--set name=value``)."""
    return dict(re.findall(r"--set (\w+)=(\S+)", ROLES_SCRIPT.read_text()))


def test_the_sink_runs_as_the_runtime_role_without_migrations(services: dict[str, Any]) -> None:
    sink_env = env(services["sink"])
    owner = env(services["migrate"])

    assert sink_env["TIMESCALE_USER"] == role_script_sets()["writer_role"] == owner["TIMESCALE_WRITER_ROLE"]
    assert sink_env["RUN_MIGRATIONS"] == "false"
    assert sink_env["TIMESCALE_SCHEMA"] == owner["TIMESCALE_SCHEMA"] == role_script_sets()["schema"]


def test_a_one_shot_migrate_job_runs_as_the_owner_and_grants_the_runtime_role(services: dict[str, Any]) -> None:
    job = services["migrate"]
    owner = env(job)

    assert job["command"] == ["migrate"] and job["build"] == "." and job["restart"] == "no"
    assert depends(job) == {"timescaledb": "service_healthy"}
    assert job["healthcheck"] == {"disable": True}, "the image's probe waits for a metrics server migrate never starts"
    assert owner["TIMESCALE_USER"] == role_script_sets()["owner_role"]
    assert owner["TIMESCALE_WRITER_ROLE"] != owner["TIMESCALE_USER"]
    # The same settings as the sink's but the role: the policies it sets are the sink's.
    role = {"TIMESCALE_USER", "TIMESCALE_PASSWORD", "TIMESCALE_WRITER_ROLE"}
    assert {k: v for k, v in owner.items() if k not in role} == {
        k: v for k, v in env(services["sink"]).items() if k not in role}
    Settings(**{k.lower(): v for k, v in owner.items()})


def test_no_service_but_the_database_uses_its_superuser(services: dict[str, Any]) -> None:
    superuser = env(services["timescaledb"])["POSTGRES_USER"]
    for name, service in services.items():
        if name != "timescaledb":
            assert env(service).get("TIMESCALE_USER", "") != superuser, name


def test_each_role_has_one_password_shared_by_the_database_and_its_user(compose: dict[str, Any],
                                                                       services: dict[str, Any]) -> None:
    raw = {name: service.get("environment") or {} for name, service in services.items()}
    # The role script reads its passwords from the database service's environment.
    for variable in ("TIMESCALE_OWNER_PASSWORD", "TIMESCALE_WRITER_PASSWORD"):
        assert f'"${variable}"' in ROLES_SCRIPT.read_text()
        assert raw["timescaledb"][variable] == f"${{{variable}:-{env(services['timescaledb'])[variable]}}}"
    assert raw["migrate"]["TIMESCALE_PASSWORD"] == raw["timescaledb"]["TIMESCALE_OWNER_PASSWORD"]
    assert raw["sink"]["TIMESCALE_PASSWORD"] == raw["timescaledb"]["TIMESCALE_WRITER_PASSWORD"]
    assert len({raw["timescaledb"][v] for v in ("POSTGRES_PASSWORD", "TIMESCALE_OWNER_PASSWORD",
                                                "TIMESCALE_WRITER_PASSWORD")}) == 3


def test_the_database_image_runs_the_role_script_at_initialisation(services: dict[str, Any]) -> None:
    files = mounts(services["timescaledb"])
    script = files["/docker-entrypoint-initdb.d/100-sink-roles.sh"]
    sql_file = re.search(r"--file (\S+)", script.read_text())

    assert script == ROLES_SCRIPT and ROLES_SCRIPT.stat().st_mode & 0o111, "executable: the image runs it"
    assert sql_file is not None and files[sql_file.group(1)] == ROOT / "deploy" / "postgres" / "sink-roles.sql"
    assert not sql_file.group(1).startswith("/docker-entrypoint-initdb.d/"), "the image would run it without variables"
    text = files[sql_file.group(1)].read_text()
    assert all(f":'{name}'" in text or f':"{name}"' in text for name in role_script_sets())
    res = subprocess.run(["bash", "-n", str(ROLES_SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------- Dockerfile


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


@pytest.fixture(scope="module")
def final_stage() -> list[tuple[str, str]]:
    steps = instructions(ROOT / "Dockerfile")
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def test_dockerfile_uses_python_311_slim_for_every_stage() -> None:
    bases = [args.split()[0] for keyword, args in instructions(ROOT / "Dockerfile") if keyword == "FROM"]

    assert bases and all(b == "python:3.11-slim" for b in bases)


def test_image_runs_as_a_non_root_user(final_stage: list[tuple[str, str]]) -> None:
    users = [args for keyword, args in final_stage if keyword == "USER"]

    assert users, "the runtime stage sets USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_image_entrypoint_is_exec_form_and_runs_the_service(final_stage: list[tuple[str, str]]) -> None:
    entry = [args for keyword, args in final_stage if keyword == "ENTRYPOINT"]
    cmd = [args for keyword, args in final_stage if keyword == "CMD"]

    assert json.loads(entry[-1]) == ["kafka-timescale-sink"]
    assert json.loads(cmd[-1]) == ["run"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "kafka-timescale-sink" in scripts


def test_image_healthcheck_probes_healthz_on_the_metrics_port(final_stage: list[tuple[str, str]]) -> None:
    [check] = [args for keyword, args in final_stage if keyword == "HEALTHCHECK"]
    env_lines = " ".join(args for keyword, args in final_stage if keyword == "ENV")

    command = json.loads(check[check.index("CMD") + len("CMD") :].strip())
    assert command[:2] == ["python", "-c"]
    assert "METRICS_PORT" in command[2] and "/healthz" in command[2] and "urllib.request" in command[2]
    assert re.search(r"\bMETRICS_PORT=9108\b", env_lines)
    assert ("EXPOSE", "9108") in final_stage


def test_image_ships_the_migrations_and_points_the_sink_at_them(final_stage: list[tuple[str, str]]) -> None:
    env_lines = " ".join(args for keyword, args in final_stage if keyword == "ENV")
    sql_dir = re.search(r"\bSINK_SQL_DIR=(\S+)", env_lines)

    assert sql_dir is not None
    assert ("COPY", f"sql/ {sql_dir.group(1)}/") in final_stage


def test_image_bakes_in_no_secret_and_installs_from_pyproject() -> None:
    steps = instructions(ROOT / "Dockerfile")
    baked = " ".join(f"{keyword} {args}" for keyword, args in steps)

    assert not re.search(r"PASSWORD|SECRET|TOKEN|sasl\.", baked, re.IGNORECASE)
    assert ("RUN", "pip install .") in steps
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    # Allow-list: everything is excluded first, then only what the build copies is let back in.
    assert ignore[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!sink/", "!dlq/", "!sql/"} <= set(ignore)
    assert not {"!.git", "!.venv", "!.dev", "!.env"} & set(ignore)


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository path of a service's bind mounts (named volumes left out)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = str(spec).split(":")[:2]
        if source.startswith("./"):
            out[target] = ROOT / source
    return out


def test_monitoring_profile_runs_prometheus_with_the_sinks_rules(services: dict[str, Any], tmp_path: Path) -> None:
    prom = services["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prom["image"])
    files = mounts(prom)
    assert all(path.is_file() for path in files.values()), files
    config_path = next(t for t in files if t.endswith("prometheus.yml"))
    assert f"--config.file={config_path}" in prom["command"]
    config = yaml.safe_load(files[config_path].read_text())
    # Every rule file it loads is mounted, and is the sink's.
    assert {files[f] for f in config["rule_files"]} == {ROOT / "deploy" / "prometheus" / "sink-rules.yml"}
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "kafka-timescale-sink"  # the rules select this job
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["sink"] and sd["port"] == int(env(services["sink"])["METRICS_PORT"])
    # promtool accepts the configuration, its rule files read from the repository.
    config["rule_files"] = [str(files[f]) for f in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    res = subprocess.run([promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_monitoring_profile_provisions_grafana_with_prometheus_and_the_dashboard(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    assert grafana["profiles"] == ["monitoring"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    assert depends(grafana) == {"prometheus": "service_healthy"}
    dirs = mounts(grafana)
    provisioning = dirs["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert datasource["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "sink.yml").read_text())["providers"]
    dashboards = dirs[provider["options"]["path"]]
    assert (dashboards / "kafka-timescale-sink.json").is_file()
    home = env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/") and (dashboards / Path(home).name).is_file()
