"""The Helm chart (deploy/helm/kafka-timescale-sink), checked offline: `helm lint` and `helm
template` for the default values and every values file in its ci/ folder, each rendered object
validated against the Kubernetes schemas bundled by kubernetes-validate (strict: unknown fields
fail), and the rendered pods checked against what the sink needs."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from sink.settings import Settings
from tests import crd_schemas

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "kafka-timescale-sink"
RELEASE, NAMESPACE = "iot", "pipeline"
# The newest Kubernetes whose schemas kubernetes-validate bundles; helm renders for it too.
K8S_VERSION = latest_version()
CASES = [None, *sorted(p.name for p in (CHART / "ci").glob("*.yaml"))]

# The seed's sizing of one replica.
SEED_RESOURCES = {"requests": {"cpu": "150m", "memory": "256Mi"}, "limits": {"cpu": "300m", "memory": "512Mi"}}
# The settings the chart sets itself (Kafka TLS/SASL, the role split, secrets).
SECURITY_SETTINGS = {"TIMESCALE_WRITER_ROLE", "TIMESCALE_PASSWORD_FILE", "KAFKA_SECURITY_PROTOCOL",
                     "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "KAFKA_SASL_PASSWORD_FILE",
                     "KAFKA_SSL_CA_LOCATION"}
KNOWN = {name.upper() for name in Settings.model_fields}
# What the chart sets from its own values (addresses, credentials, identity, migrations, ports,
# shutdown); `config` takes every other setting, and values.schema.json refuses these there.
CHART_SETS = {"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_INPUT_TOPIC", "KAFKA_GROUP_ID", "KAFKA_TRANSACTIONAL_ID",
              "TIMESCALE_HOST", "TIMESCALE_PORT", "TIMESCALE_DB", "TIMESCALE_USER", "TIMESCALE_PASSWORD",
              "TIMESCALE_SSLMODE", "TIMESCALE_SSLROOTCERT", "TIMESCALE_SSLCERT", "TIMESCALE_SSLKEY", "RUN_MIGRATIONS",
              "METRICS_PORT", "SHUTDOWN_TIMEOUT"} | SECURITY_SETTINGS
# Set in every sink pod, whatever the values.
REQUIRED = {"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_INPUT_TOPIC", "KAFKA_GROUP_ID", "KAFKA_TRANSACTIONAL_ID",
            "TIMESCALE_HOST", "TIMESCALE_PORT", "TIMESCALE_DB", "TIMESCALE_USER", "TIMESCALE_PASSWORD",
            "RUN_MIGRATIONS", "METRICS_PORT", "SHUTDOWN_TIMEOUT"}


@cache
def helm() -> str:
    """The pinned Helm, built once into .cache/ by dev/helm.sh; a failed build fails, never skips."""
    res = subprocess.run([str(ROOT / "dev" / "helm.sh")], capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        pytest.fail(f"dev/helm.sh could not build Helm:\n{res.stderr[-3000:]}")
    return res.stdout.strip().splitlines()[-1]


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "HELM_CACHE_HOME": "/nonexistent",
                               "HELM_CONFIG_HOME": "/nonexistent", "HELM_DATA_HOME": "/nonexistent"})


def values_args(case: str | None, sets: Sequence[str] = ()) -> list[str]:
    args = ["-f", str(CHART / "ci" / case)] if case else []
    for s in sets:
        args += ["--set", s]
    return args


@cache
def _render(case: str | None, sets: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    res = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", K8S_VERSION,
                   *values_args(case, sets))
    assert res.returncode == 0, res.stderr
    return tuple(d for d in yaml.safe_load_all(res.stdout) if d)


def render(case: str | None = None, *sets: str) -> list[dict[str, Any]]:
    return list(_render(case, tuple(sets)))


def refusal(case: str | None, *sets: str) -> str:
    """helm template's error for values it must refuse."""
    res = run_helm("template", RELEASE, str(CHART), *values_args(case, sets))
    assert res.returncode != 0, f"rendered although it should not: {sets}"
    return res.stderr


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(c)


def pod_env(docs: list[dict[str, Any]], workload: dict[str, Any]) -> dict[str, Any]:
    """The container's environment: the ConfigMaps it reads, then its own env (which wins);
    values are strings, or the valueFrom source."""
    c = container(workload)
    out: dict[str, Any] = {}
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for source in c.get("envFrom", []):
        out.update(configmaps[source["configMapRef"]["name"]]["data"])
    for e in c.get("env", []):
        out[e["name"]] = e.get("value", e.get("valueFrom"))
    return out


def settings_of(env: dict[str, Any], tmp_path: Path) -> Settings:
    """The settings the sink would load from this environment (secrets and mounted files stood in for)."""
    plain = {k: v for k, v in env.items() if isinstance(v, str)}
    plain["TIMESCALE_PASSWORD"] = "from-the-secret"
    if "KAFKA_SASL_PASSWORD" in env:
        plain["KAFKA_SASL_PASSWORD"] = "from-the-secret"
    for name in ("TIMESCALE_SSLROOTCERT", "TIMESCALE_SSLCERT", "TIMESCALE_SSLKEY"):
        if name in plain:
            (tmp_path / name).write_text("mounted from a Secret")
            plain[name] = str(tmp_path / name)
    if "KAFKA_SSL_CA_LOCATION" in plain:  # librdkafka loads it while the settings are checked: a real one
        ca = tmp_path / "kafka-ca.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(tmp_path / "kafka-ca.key"), "-out", str(ca), "-subj", "/CN=ca",
                        "-days", "1"], check=True, capture_output=True)
        plain["KAFKA_SSL_CA_LOCATION"] = str(ca)
    return Settings(**{k.lower(): v for k, v in plain.items() if k.lower() in Settings.model_fields})


# --------------------------------------------------------------------------- lint and validation


@pytest.mark.parametrize("case", CASES)
def test_chart_lints_cleanly(case: str | None) -> None:
    res = run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", K8S_VERSION,
                   *values_args(case))
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_object_validates_strictly(case: str | None) -> None:
    docs = render(case)
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in crd_schemas.SCHEMAS:
            crd_schemas.validate(doc)
        else:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where}: {e.message} at {list(e.absolute_path)}")
    assert {d["kind"] for d in docs} >= {"Deployment", "ConfigMap", "Service"}


def test_strict_validation_refuses_an_unknown_field() -> None:
    deployment = one(render(), "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/healthz", "port": 9108}}

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    monitor = one(render("production.yaml"), "ServiceMonitor")
    bad = yaml.safe_load(yaml.safe_dump(monitor))
    bad["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        crd_schemas.validate(bad)


def test_kinds_follow_the_values() -> None:
    def kinds(case: str | None) -> list[str]:
        return sorted(d["kind"] for d in render(case))

    # Defaults: credentials in an existing Secret, no ServiceMonitor, no KEDA.
    assert kinds(None) == ["ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Service"]
    assert kinds("production.yaml") == ["ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Service",
                                        "ServiceMonitor"]
    assert kinds("autoscaling.yaml") == ["ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "ScaledObject",
                                         "Service"]
    assert kinds("chart-secrets.yaml") == ["ConfigMap", "Deployment", "Job", "Secret", "Secret", "Service"]
    assert kinds("external-migration.yaml") == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Secret", "Service"]


# --------------------------------------------------------------------------- the sink's pods


@pytest.mark.parametrize("case", CASES)
def test_deployment_has_the_seed_limits_probes_and_a_locked_down_container(case: str | None) -> None:
    docs = render(case)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(deployment)
    env = pod_env(docs, deployment)
    port = int(env["METRICS_PORT"])

    assert c["resources"] == SEED_RESOURCES
    assert c["args"] == ["run"]
    assert c["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # SIGTERM finishes the batch in hand within SHUTDOWN_TIMEOUT: the pod is not killed before.
    assert pod["terminationGracePeriodSeconds"] >= float(env["SHUTDOWN_TIMEOUT"]) + 10
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user (Dockerfile)
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "privileged": False, "capabilities": {"drop": ["ALL"]}}
    assert pod["automountServiceAccountToken"] is False
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


@pytest.mark.parametrize("case", CASES)
def test_sink_env_sets_every_required_variable_and_no_unknown_one(case: str | None, tmp_path: Path) -> None:
    docs = render(case)
    deployment = one(docs, "Deployment")
    env = pod_env(docs, deployment)

    assert set(env) <= KNOWN, f"not settings: {sorted(set(env) - KNOWN)}"
    assert set(env) >= REQUIRED, f"missing: {sorted(REQUIRED - set(env))}"
    assert env["KAFKA_TRANSACTIONAL_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["TIMESCALE_USER"] == "sink_writer"
    assert set(env["TIMESCALE_PASSWORD"]) == {"secretKeyRef"}
    assert env["RUN_MIGRATIONS"] == "false"
    # The values load as the sink would load them.
    settings = settings_of(env, tmp_path)
    assert settings.run_migrations is False
    assert settings.metrics_port == container(deployment)["ports"][0]["containerPort"]


def test_passwords_come_from_the_named_secrets() -> None:
    docs = render()
    sink_env = pod_env(docs, one(docs, "Deployment"))
    job_env = pod_env(docs, one(docs, "Job"))

    assert sink_env["TIMESCALE_PASSWORD"] == {"secretKeyRef": {"name": "kafka-timescale-sink-db",
                                                               "key": "writer-password"}}
    assert job_env["TIMESCALE_PASSWORD"] == {"secretKeyRef": {"name": "kafka-timescale-sink-db",
                                                              "key": "owner-password"}}
    docs = render("chart-secrets.yaml")
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    writer = pod_env(docs, one(docs, "Deployment"))["TIMESCALE_PASSWORD"]["secretKeyRef"]
    owner = pod_env(docs, one(docs, "Job"))["TIMESCALE_PASSWORD"]["secretKeyRef"]
    assert secrets[writer["name"]]["stringData"][writer["key"]] == "writer-secret"
    assert secrets[owner["name"]]["stringData"][owner["key"]] == "owner-secret"
    # The owner's password exists only around the migration: a hook deleted once the hooks succeeded.
    hook = secrets[owner["name"]]["metadata"]["annotations"]
    assert hook["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(hook["helm.sh/hook-weight"]) < 0
    assert "hook-succeeded" in hook["helm.sh/hook-delete-policy"]
    assert "annotations" not in secrets[writer["name"]]["metadata"]
    # No password, anywhere, outside a Secret.
    text = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    assert "writer-secret" not in text and "owner-secret" not in text


def test_production_values_wire_tls_and_sasl_through_mounted_secrets(tmp_path: Path) -> None:
    docs = render("production.yaml")
    deployment = one(docs, "Deployment")
    env = pod_env(docs, deployment)
    mounts = {m["name"]: m["mountPath"] for m in container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}

    assert env["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL" and env["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["KAFKA_SASL_PASSWORD"] == {"secretKeyRef": {"name": "iot-sink-kafka", "key": "password"}}
    assert env["KAFKA_SSL_CA_LOCATION"] == mounts["kafka-tls"] + "/ca.crt"
    assert volumes["kafka-tls"]["secret"]["secretName"] == "kafka-cluster-ca"
    assert env["TIMESCALE_SSLMODE"] == "verify-full"
    for name, file in (("TIMESCALE_SSLROOTCERT", "ca.crt"), ("TIMESCALE_SSLCERT", "tls.crt"),
                       ("TIMESCALE_SSLKEY", "tls.key")):
        assert env[name] == f"{mounts['pg-tls']}/{file}"
    # libpq takes a key file owned by root only when no one but its group can read it.
    assert volumes["pg-tls"]["secret"]["defaultMode"] == 0o440
    settings = settings_of(env, tmp_path)
    assert settings.timescale_schema == "iot" and settings.batch_size == 5000


def test_settings_changes_roll_the_pods() -> None:
    before = one(render(), "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    after = one(render(None, "config.BATCH_SIZE=5000"), "Deployment")["spec"]["template"]["metadata"]["annotations"]

    assert after["checksum/config"] != before


# --------------------------------------------------------------------------- migration Job


@pytest.mark.parametrize("case", [c for c in CASES if c != "external-migration.yaml"])
def test_migration_job_runs_before_the_release_with_the_owner_role(case: str | None, tmp_path: Path) -> None:
    docs = render(case)
    job = one(docs, "Job")
    deployment = one(docs, "Deployment")
    job_env = pod_env(docs, job)
    sink_env = pod_env(docs, deployment)

    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert container(job)["args"] == ["migrate"]
    assert container(job)["image"] == container(deployment)["image"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["activeDeadlineSeconds"] > 0
    assert job_env["TIMESCALE_USER"] == "sink_owner"
    assert job_env["TIMESCALE_WRITER_ROLE"] == sink_env["TIMESCALE_USER"] == "sink_writer"
    assert set(job_env) <= KNOWN
    # The same settings as the pods (the schema settings above all), but for identity.
    identity = {"TIMESCALE_USER", "TIMESCALE_PASSWORD", "TIMESCALE_WRITER_ROLE", "KAFKA_TRANSACTIONAL_ID",
                "RUN_MIGRATIONS"}
    assert {k: v for k, v in job_env.items() if k not in identity} == {
        k: v for k, v in sink_env.items() if k not in identity}
    assert container(job)["securityContext"] == container(deployment)["securityContext"]
    assert container(job)["volumeMounts"] == container(deployment)["volumeMounts"]
    assert settings_of(job_env, tmp_path).timescale_user == "sink_owner"


def test_without_the_migration_job_the_sink_still_does_not_migrate() -> None:
    docs = render("external-migration.yaml")

    assert not [d for d in docs if d["kind"] == "Job"]
    assert pod_env(docs, one(docs, "Deployment"))["RUN_MIGRATIONS"] == "false"


# --------------------------------------------------------------------------- metrics, PDB, scaling


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("case", CASES)
def test_metrics_service_and_pdb_select_the_sink_pods_only(case: str | None) -> None:
    docs = render(case)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service")

    assert selects(service["spec"]["selector"], pod_labels)
    job = [d for d in docs if d["kind"] == "Job"]
    for j in job:  # the migration's pod is no metrics target
        assert not selects(service["spec"]["selector"], j["spec"]["template"]["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert port["name"] == "metrics" and port["targetPort"] == "metrics"
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        assert selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
        assert pdb["spec"]["maxUnavailable"] == 1


def test_service_monitor_scrapes_the_metrics_service_as_the_job_the_alerts_select() -> None:
    docs = render("production.yaml")
    service = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]

    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == job["job_name"]
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s",
                                             "scrapeTimeout": "10s"}]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_keda_scales_on_the_groups_lag_up_to_the_partition_count() -> None:
    docs = render("autoscaling.yaml")
    deployment = one(docs, "Deployment")
    scaled = one(docs, "ScaledObject")
    env = pod_env(docs, deployment)
    (trigger,) = scaled["spec"]["triggers"]

    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert scaled["spec"]["scaleTargetRef"] == {"name": deployment["metadata"]["name"]}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (2, 12)
    assert trigger["type"] == "kafka"
    assert trigger["metadata"] == {"bootstrapServers": env["KAFKA_BOOTSTRAP_SERVERS"],
                                   "consumerGroup": env["KAFKA_GROUP_ID"], "topic": env["KAFKA_INPUT_TOPIC"],
                                   "lagThreshold": "20000", "offsetResetPolicy": "earliest",
                                   "allowIdleConsumers": "false"}
    assert trigger["authenticationRef"] == {"name": "kafka-scaler-auth"}
    assert one(render(), "Deployment")["spec"]["replicas"] == 1


def test_replicas_beyond_the_partition_count_are_refused() -> None:
    assert "replicaCount 7 exceeds kafka.inputPartitions 6" in refusal(None, "replicaCount=7")
    assert "autoscaling.maxReplicas 13 exceeds kafka.inputPartitions 12" in refusal(
        "autoscaling.yaml", "autoscaling.maxReplicas=13")
    assert one(render(None, "replicaCount=6"), "Deployment")["spec"]["replicas"] == 6


# --------------------------------------------------------------------------- values the chart refuses


def test_values_schema_takes_exactly_the_settings_the_chart_does_not_set_itself() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["config"]["propertyNames"]["enum"])
    rendered = set().union(*(pod_env(render(c), one(render(c), "Deployment")) for c in CASES))

    assert allowed == {name.upper() for name in Settings.model_fields} - CHART_SETS
    # Each name the chart claims it sets is one it renders in some tested values file.
    assert rendered >= CHART_SETS - SECURITY_SETTINGS


@pytest.mark.parametrize("setting", ["config.TIMESCALE_PASSWORD=x", "config.KAFKA_TRANSACTIONAL_ID=x",
                                     "config.RUN_MIGRATIONS=true", "config.BATCH_SIZ=100"])
def test_config_refuses_names_the_chart_owns_and_misspelt_ones(setting: str) -> None:
    name = setting.split(".", 1)[1].split("=", 1)[0]

    assert f"invalid propertyName '{name}'" in refusal(None, setting)


def test_missing_credentials_are_refused() -> None:
    assert "database.credentials" in refusal(None, "database.credentials.existingSecret=")
    assert "ownerPassword" in refusal(None, "database.credentials.existingSecret=",
                                      "database.credentials.writerPassword=w")
    assert "kafka.sasl.existingSecret" in refusal(None, "kafka.sasl.mechanism=PLAIN")


# --------------------------------------------------------------------------- compose.yaml


# Where the chart's defaults may differ from compose.yaml's sink environment: addresses, secrets
# and identity only.
ALLOWED_DIFFERENCES = {
    "timescale_user": "identity: the chart's pods run as the runtime role sink_writer",
    "timescale_password": "secret: from a Kubernetes Secret",
    "kafka_transactional_id": "identity: each pod's name",
}


def test_chart_defaults_and_compose_agree_on_every_setting(tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    compose_env = {k: str(v) for k, v in compose["x-sink-environment"].items()}
    for k, v in compose_env.items():  # ${VAR:-default} as compose runs it with nothing set
        if v.startswith("${") and ":-" in v:
            compose_env[k] = v.split(":-", 1)[1].rstrip("}")
    docs = render()
    chart_env = pod_env(docs, one(docs, "Deployment"))

    in_compose = settings_of(compose_env, tmp_path).model_dump()
    in_chart = settings_of(chart_env, tmp_path).model_dump()
    differ = {k for k in in_compose if in_compose[k] != in_chart[k]}
    unexplained = differ - set(ALLOWED_DIFFERENCES)
    assert not unexplained, {k: (in_compose[k], in_chart[k]) for k in unexplained}
    # The chart states each of compose's settings itself, rather than leaning on a default.
    assert set(compose_env) - {k.upper() for k in ALLOWED_DIFFERENCES} <= set(chart_env)
