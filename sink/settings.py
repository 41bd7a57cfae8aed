"""Service configuration from environment variables (the spec's names, validated at start)."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sink.logs import kafka_client_logger

# The sink's database sessions say who they are (pg_stat_activity.application_name).
APPLICATION_NAME = "kafka-timescale-sink"

# librdkafka keys the sink sets itself; passing them through would break its guarantees.
_RESERVED_KAFKA_KEYS = frozenset(
    {"enable.auto.commit", "enable.auto.offset.store", "group.id", "bootstrap.servers"}
)
# Each KAFKA_* security setting and the librdkafka key it sets.  Where a setting is given,
# KAFKA_EXTRA_CONFIG may not set its key too (which one would win is nobody's guess).
_KAFKA_SECURITY_KEYS = {
    "kafka_security_protocol": "security.protocol",
    "kafka_sasl_mechanism": "sasl.mechanism",
    "kafka_sasl_username": "sasl.username",
    "kafka_sasl_password": "sasl.password",
    "kafka_ssl_ca_location": "ssl.ca.location",
}


class Settings(BaseSettings):
    """Every setting is an env var of the same name in upper case (e.g. ``BATCH_SIZE``)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    # --- Kafka
    kafka_bootstrap_servers: str = Field("kafka:29092", min_length=1)
    kafka_input_topic: str = Field("decoded_iot_data", min_length=1, max_length=249)
    kafka_group_id: str = Field("timescale_sink_group", min_length=1)
    # Empty means "<input topic>.dlq".
    kafka_dlq_topic: str = ""
    # A new group starts from the earliest offset: a sink must not skip data.
    kafka_auto_offset_reset: Literal["earliest", "latest", "error"] = "earliest"
    # Partitions of the DLQ topic when the sink has to create it; 0 = same as the input topic.
    kafka_dlq_partitions: int = Field(0, ge=0)
    kafka_dlq_replication_factor: int = Field(-1, ge=-1)
    # JSON object of extra librdkafka settings (TLS/SASL...), applied to consumer and producer.
    # NoDecode: our validator parses the JSON, so a malformed value is a ConfigError naming
    # the variable; repr=False keeps SASL passwords out of reprs.
    kafka_extra_config: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict, repr=False)
    kafka_max_poll_interval_ms: int = Field(300_000, ge=10_000)
    # TLS and SASL to the brokers (see docs/security.md), for every Kafka client of the sink
    # and of sink-dlq.  PLAINTEXT/SSL need no user; SASL_* need KAFKA_SASL_USERNAME/PASSWORD.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_sasl_password_file: str = ""
    # The CA that signed the brokers' certificates (PEM); empty = the system's CAs.
    kafka_ssl_ca_location: str = ""
    # DLQ records + offset commit in one Kafka transaction (exactly-once DLQ).  false = produce,
    # wait for acks, then commit (at-least-once DLQ) for clusters without transaction ACLs.
    kafka_transactional: bool = True
    # While the next batch is being written, written batches wait up to this many seconds to
    # share one commit (transaction); 0 = commit every batch.  A crash re-reads at most this
    # much more (absorbed by ON CONFLICT DO NOTHING).
    kafka_commit_interval: float = Field(0.5, ge=0, le=60)
    # Empty = unique per process.  Set a stable, per-replica value (pod name) so a restart
    # aborts the previous process's open transaction immediately instead of after 10 s.
    kafka_transactional_id: str = ""

    # --- Database
    timescale_host: str = Field("timescaledb", min_length=1)  # empty would mean a Unix socket
    timescale_port: int = Field(5432, ge=1, le=65535)
    timescale_db: str = "timeseries"
    timescale_user: str = "ts_user"
    timescale_password: SecretStr = SecretStr("ts_password")
    # A file holding the password (Docker/Kubernetes secrets), read when TIMESCALE_PASSWORD is unset.
    timescale_password_file: str = ""
    timescale_connect_timeout: int = Field(10, ge=1)
    # TLS to PostgreSQL, as libpq's sslmode/sslrootcert/sslcert/sslkey (empty: libpq's default).
    timescale_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    timescale_sslrootcert: str = ""
    timescale_sslcert: str = ""
    timescale_sslkey: str = ""
    # Schema holding iot_measurements and the migrations table (tests use one per test).
    timescale_schema: str = Field("public", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    # The runtime role: `migrate` grants it exactly what `run` and `sink-dlq replay` need.
    timescale_writer_role: str = Field("", max_length=63)

    # --- Writing (sink/upsert.py).  ignore: INSERT ... ON CONFLICT DO NOTHING, the first record of
    # a key stays.  update: a later record of the key overwrites it where something differs;
    # kafka_timestamp guards the update with the record's Kafka timestamp (source_version), so
    # re-applying an older record (a DLQ replay) never overwrites a newer one.
    write_mode: Literal["ignore", "update"] = "ignore"
    write_version: Literal["kafka_timestamp", "none"] = "kafka_timestamp"
    # Batches written at the same time, each on its own connection (batches sharing a partition
    # still insert in Kafka's order; docs/performance.md says when to raise it).
    write_concurrency: int = Field(2, ge=1, le=16)

    # --- Batching.  The spec's 100 rows / 5 s is far below what one COPY can take.  2500 rows
    # (~1 MB) gave the same throughput as 5000 or 10000 in bench/ and half the p99 latency at
    # 5k records/s (0.8 s vs 1.3 s); 1 s bounds the latency of a slow stream.
    batch_size: int = Field(2500, ge=1, le=1_000_000)
    batch_timeout: float = Field(1.0, gt=0, le=3600)

    # --- Retries (connection-class failures).  0 attempts = retry forever.
    retry_initial_backoff: float = Field(0.5, gt=0)
    retry_max_backoff: float = Field(30.0, gt=0)
    retry_max_attempts: int = Field(0, ge=0)

    # --- Poison handling
    # Bisection splits a poisoned batch at most this many times (2 writes per split), then
    # writes the rest row by row, so a mostly-bad batch costs O(n) statements, not O(n log n).
    bisect_max_splits: int = Field(64, ge=1)
    dlq_breaker_enabled: bool = True
    # Trip when more than this share of the last `window` records went to the DLQ ...
    dlq_breaker_ratio: float = Field(0.5, gt=0, le=1)
    dlq_breaker_window: int = Field(1000, ge=1)
    # ... or when this many records in a row did.
    dlq_breaker_consecutive: int = Field(500, ge=1)

    # --- Shutdown
    shutdown_timeout: float = Field(30.0, gt=0)

    # --- Schema (see sql/ and README "Schema")
    run_migrations: bool = True
    timescaledb_required: bool = False
    timescale_chunk_interval: str = "1 day"
    timescale_compress_after: str = "1 day"  # "0"/"off" disables the compression policy
    timescale_retention: str = "90 days"  # "0"/"off" disables the retention policy
    timescale_cagg_refresh_interval: str = "30 minutes"

    # --- Operability
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        """Each secret's ``*_FILE`` variant (SECRET_FILES): the file's content, less its trailing
        line break, stands for the variable when that is unset.  The content is never quoted."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for secret, file_field in SECRET_FILES.items():
            path = data.get(file_field)
            if not path:
                continue
            env, file_env = secret.upper(), file_field.upper()
            if data.get(secret) not in (None, ""):
                raise ValueError(f"{env} and {file_env} are both set: set one")
            try:
                with open(path, encoding="utf-8") as f:
                    value = f.read().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{file_env}={path!r} cannot be read: {type(e).__name__}"
                                 f"{f' ({e.strerror})' if isinstance(e, OSError) and e.strerror else ''}") from None
            if not value:
                raise ValueError(f"{file_env}={path!r} is empty")
            data[secret] = value
        return data

    @field_validator("kafka_extra_config", mode="before")
    @classmethod
    def _parse_extra(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v.strip():
                return {}
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"must be a JSON object of librdkafka settings: {e.msg}") from None
        if not isinstance(v, dict):
            raise ValueError("must be a JSON object of librdkafka settings")
        bad = _RESERVED_KAFKA_KEYS.intersection(v)
        if bad:
            raise ValueError(f"sets {sorted(bad)}, which the sink controls itself")
        conf = {str(k): str(val) for k, val in v.items()}
        refusal = _librdkafka_refusal(conf)
        if refusal:
            raise ValueError(f"refused by librdkafka: {refusal}")
        return conf

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.retry_max_backoff < self.retry_initial_backoff:
            raise ValueError("RETRY_MAX_BACKOFF must be >= RETRY_INITIAL_BACKOFF")
        if self.dlq_topic == self.kafka_input_topic:
            raise ValueError("KAFKA_DLQ_TOPIC must differ from KAFKA_INPUT_TOPIC")
        self._check_tls_files()
        if self.timescale_writer_role and self.timescale_writer_role == self.timescale_user:
            raise ValueError("TIMESCALE_WRITER_ROLE names TIMESCALE_USER: it is the runtime role that the "
                             "owner (TIMESCALE_USER of `migrate`) grants to, not the owner itself")
        self._check_kafka_security()
        return self

    def _check_kafka_security(self) -> None:
        given = {name for name in _KAFKA_SECURITY_KEYS if name in self.model_fields_set
                 or (name == "kafka_sasl_password" and self.kafka_sasl_password_file)}
        both = sorted(f"{name.upper()} ({_KAFKA_SECURITY_KEYS[name]})" for name in given
                      if _KAFKA_SECURITY_KEYS[name] in self.kafka_extra_config)
        if both:
            raise ValueError(f"KAFKA_EXTRA_CONFIG sets what {', '.join(both)} already set: set each once")
        conf = self.kafka_client_config()
        sasl = conf.get("security.protocol", "").upper().startswith("SASL_")
        if sasl and conf.get("sasl.mechanism") in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and not (
                conf.get("sasl.username") and conf.get("sasl.password")):
            raise ValueError(f"security protocol {conf['security.protocol']} with {conf['sasl.mechanism']} needs "
                             "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE)")
        if self.kafka_ssl_ca_location and not os.access(self.kafka_ssl_ca_location, os.R_OK):
            raise ValueError(f"KAFKA_SSL_CA_LOCATION={self.kafka_ssl_ca_location!r} is not a readable file")
        if given:
            refusal = _librdkafka_refusal({k: v for k, v in conf.items() if k != "bootstrap.servers"})
            if refusal:
                raise ValueError(f"the Kafka security settings are refused by librdkafka: {refusal}")

    def kafka_security_config(self) -> dict[str, str]:
        """The librdkafka settings of KAFKA_SECURITY_PROTOCOL and the rest (the password included)."""
        conf: dict[str, str] = {"security.protocol": self.kafka_security_protocol}
        if self.kafka_security_protocol.startswith("SASL_") or "kafka_sasl_mechanism" in self.model_fields_set:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
        if self.kafka_sasl_username:
            conf["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password.get_secret_value():
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_ssl_ca_location:
            conf["ssl.ca.location"] = self.kafka_ssl_ca_location
        return conf

    def kafka_client_config(self) -> dict[str, Any]:
        """What every Kafka client of the sink starts from: security, KAFKA_EXTRA_CONFIG, the
        brokers, and the logger that makes librdkafka's own log lines JSON events.  Includes the
        SASL password: pass it to librdkafka, never log it."""
        return {**self.kafka_security_config(), **self.kafka_extra_config,
                "bootstrap.servers": self.kafka_bootstrap_servers, "logger": kafka_client_logger()}

    def _check_tls_files(self) -> None:
        # Found now, named by variable, rather than as a connection error after the first retry.
        for env, path in (("TIMESCALE_SSLROOTCERT", self.timescale_sslrootcert),
                          ("TIMESCALE_SSLCERT", self.timescale_sslcert), ("TIMESCALE_SSLKEY", self.timescale_sslkey)):
            if path and path != "system" and not os.access(path, os.R_OK):
                raise ValueError(f"{env}={path!r} is not a readable file")
        if bool(self.timescale_sslcert) != bool(self.timescale_sslkey):
            raise ValueError("TIMESCALE_SSLCERT and TIMESCALE_SSLKEY go together (a client certificate and its key)")
        if self.timescale_sslmode.startswith("verify") and not self.timescale_sslrootcert:
            default = os.path.expanduser("~/.postgresql/root.crt")
            if not os.access(default, os.R_OK):
                raise ValueError(f"TIMESCALE_SSLMODE={self.timescale_sslmode} verifies the server against a CA: "
                                 "set TIMESCALE_SSLROOTCERT to its certificate (or 'system' for the OS's CAs)")

    @property
    def dlq_topic(self) -> str:
        return self.kafka_dlq_topic or f"{self.kafka_input_topic}.dlq"

    def conninfo(self) -> str:
        """libpq conninfo including the password: pass it to psycopg, never log it."""
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host=self.timescale_host,
            port=self.timescale_port,
            dbname=self.timescale_db,
            user=self.timescale_user,
            password=self.timescale_password.get_secret_value(),
            connect_timeout=self.timescale_connect_timeout,
            application_name=APPLICATION_NAME,
            # Notice a dead peer in about a minute, not after the kernel's two hours.
            keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
            tcp_user_timeout=60_000,
            options=f"-c search_path={self.timescale_schema},public",
            sslmode=self.timescale_sslmode,
            **{k: v for k, v in (("sslrootcert", self.timescale_sslrootcert), ("sslcert", self.timescale_sslcert),
                                 ("sslkey", self.timescale_sslkey)) if v},
        )

    def safe_summary(self) -> dict[str, Any]:
        """Settings fit for a log line: secrets and pass-through values masked."""
        out = self.model_dump(exclude={"timescale_password", "kafka_extra_config", "kafka_sasl_password"})
        out["timescale_password"] = "**********"
        out["kafka_sasl_password"] = "**********" if self.kafka_sasl_password.get_secret_value() else ""
        out["kafka_extra_config"] = {k: "***" for k in self.kafka_extra_config}
        out["dlq_topic"] = self.dlq_topic
        return out


def _librdkafka_refusal(conf: dict[str, str]) -> str | None:
    """librdkafka's own verdict on the pass-through settings, at load time: a client built from
    them alone (no brokers, so it connects nowhere) is refused for an unknown property, a bad
    value or a TLS file it cannot load.  Found here, that is a bad setting (exit 2) instead of a
    failure after the migrations ran.  Quoted values are masked: they may be secrets."""
    from confluent_kafka import KafkaException, Producer

    try:
        Producer({**conf, "log_level": 0})
    except KafkaException as e:
        err = e.args[0] if e.args else None
        text = str(err.str()) if err is not None and hasattr(err, "str") else str(e)
        for value in conf.values():
            text = text.replace(f'"{value}"', '"***"')
        return text
    return None


# Secrets that may come from a file (Docker and Kubernetes secrets): secret setting -> the
# setting naming a file that holds it (``<NAME>_FILE``), read when <NAME> is unset.
SECRET_FILES = {"timescale_password": "timescale_password_file", "kafka_sasl_password": "kafka_sasl_password_file"}


class ConfigError(ValueError):
    """Invalid configuration: the message names the env var(s)."""


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment; a ConfigError names each bad variable."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    problem: str
    try:
        return Settings(**overrides)
    except ValidationError as e:
        parts = []
        for err in e.errors(include_input=False):
            loc = "_".join(str(x) for x in err["loc"]).upper() or "configuration"
            parts.append(f"{loc}: {err['msg']}")
        problem = "; ".join(parts)
    except SettingsError as e:
        problem = str(e).split(" from source", 1)[0]
    # Raised outside the except blocks: the original error, which may quote the environment
    # (passwords included), must not ride along as __context__.
    raise ConfigError("invalid configuration: " + problem)
