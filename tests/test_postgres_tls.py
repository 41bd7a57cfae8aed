"""TLS to PostgreSQL for real: a CA and a server certificate made with openssl, `ssl = on` in the
local cluster; verify-full connects (pg_stat_ssl says so), a wrong CA or host name and `require`
against a server without TLS are fatal errors that name the settings, at once."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dev import services, testkit
from sink.settings import ConfigError, load_settings

pytestmark = [pytest.mark.integration, pytest.mark.plain_postgres]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-subj", f"/CN={name}", cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt, other-ca.crt, and server.crt/.key for the host name localhost, signed by ca."""
    d = tmp_path_factory.mktemp("tls")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", "server.crt", "-extfile", "san.ext", cwd=d)
    return d


def admin(statement: str) -> str:
    return services.psql_admin(statement, db="postgres")


def ssl_setting() -> str:
    return admin("SHOW ssl").strip()


@pytest.fixture
def tls_server(infra: None, certs: Path) -> Iterator[None]:
    """The local cluster with ssl = on (a reload), back off afterwards, pass or fail."""
    data = services.pg_home() / "data"
    for name in ("server.crt", "server.key"):
        target = data / f"test-{name}"
        shutil.copy(certs / name, target)
        os.chmod(target, 0o600)  # PostgreSQL refuses a key others may read
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(target, user.pw_uid, user.pw_gid)
    try:
        admin("ALTER SYSTEM SET ssl_cert_file = 'test-server.crt'")
        admin("ALTER SYSTEM SET ssl_key_file = 'test-server.key'")
        admin("ALTER SYSTEM SET ssl = on")
        admin("SELECT pg_reload_conf()")
        testkit.wait_for(lambda: ssl_setting() == "on", 10, what="ssl = on after the reload")
        yield
    finally:
        for name in ("ssl", "ssl_cert_file", "ssl_key_file"):
            admin(f"ALTER SYSTEM RESET {name}")
        admin("SELECT pg_reload_conf()")
        testkit.wait_for(lambda: ssl_setting() == "off", 10, what="ssl = off after the reload")


def migrate(schema: str, topic: str, group: str, **env: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sink", "migrate"], capture_output=True, text=True, timeout=60,
                          env=testkit.sink_env(schema, topic, group, RETRY_MAX_ATTEMPTS="0", **env), cwd=testkit.ROOT)


def test_require_against_a_server_without_tls_is_fatal_at_once(schema: str, group: str) -> None:
    assert ssl_setting() == "off"
    started = time.monotonic()
    res = migrate(schema, "t", group, TIMESCALE_SSLMODE="require")
    assert res.returncode == 1, res.stderr
    assert "server does not support SSL" in res.stderr and "TIMESCALE_SSLMODE" in res.stderr
    assert time.monotonic() - started < 30  # not a retry loop (RETRY_MAX_ATTEMPTS=0: for ever)


def settings_from(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Any:
    for k in list(os.environ):
        if k.startswith(("KAFKA_", "TIMESCALE_")):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return load_settings()


def test_verify_full_connects_over_tls(schema: str, group: str, certs: Path, tls_server: None,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"TIMESCALE_HOST": "localhost", "TIMESCALE_SSLMODE": "verify-full",
           "TIMESCALE_SSLROOTCERT": str(certs / "ca.crt")}
    res = migrate(schema, "t", group, **env)
    assert res.returncode == 0, res.stdout + res.stderr
    settings = settings_from(monkeypatch, {k: v for k, v in testkit.sink_env(schema, "t", group, **env).items()
                                           if k.startswith("TIMESCALE_")})
    with psycopg.connect(settings.conninfo()) as conn:
        row = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row is not None and row[0] is True and row[1].startswith("TLS")


@pytest.mark.parametrize(("host", "ca", "said"), [
    ("localhost", "other-ca.crt", "certificate verify failed"),
    ("127.0.0.1", "ca.crt", "does not match host name"),
])
def test_a_wrong_ca_or_host_name_is_fatal_at_once(schema: str, group: str, certs: Path, tls_server: None,
                                                  host: str, ca: str, said: str) -> None:
    res = migrate(schema, "t", group, TIMESCALE_HOST=host, TIMESCALE_SSLMODE="verify-full",
                  TIMESCALE_SSLROOTCERT=str(certs / ca))
    assert res.returncode == 1
    assert said in res.stderr and "TIMESCALE_SSLROOTCERT" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(("env", "said"), [
    ({"TIMESCALE_SSLROOTCERT": "/nonexistent/ca.crt"}, "TIMESCALE_SSLROOTCERT='/nonexistent/ca.crt' is not"),
    ({"TIMESCALE_SSLCERT": "/etc/hostname"}, "TIMESCALE_SSLCERT and TIMESCALE_SSLKEY go together"),
    ({"TIMESCALE_SSLMODE": "verify-full", "HOME": "/nonexistent"}, "set TIMESCALE_SSLROOTCERT"),
    ({"TIMESCALE_SSLMODE": "on"}, "TIMESCALE_SSLMODE"),
])
def test_tls_settings_are_checked_before_connecting(env: dict[str, str], said: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from(monkeypatch, {"TIMESCALE_HOST": "db", **env})
    assert said in str(raised.value)
