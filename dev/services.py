"""Local real Kafka (KRaft, from Maven Central jars) and PostgreSQL for dev, tests and chaos.

Standard library only: this runs before the project's virtualenv exists.

    python3 dev/services.py up        # start both (idempotent, returns at once if running)
    python3 dev/services.py down      # clean stop of both
    python3 dev/services.py status    # ours or someone else's, on which ports
    python3 dev/services.py env       # the sink's variables for these servers
    python3 dev/services.py check     # are the ports free (or ours)?  Instant, before installs
    DEV_PG_FLAVOR=timescaledb python3 dev/services.py up   # the TimescaleDB cluster, where built
    DEV_KAFKA_SECURITY=sasl_ssl python3 dev/services.py up # + a SASL_SSL listener and ACLs (see below)

State lives in the ignored folders `.cache/` (jars, reused across runs) and `.dev/`
(broker data, PostgreSQL cluster, logs).  Everything listens on loopback only.
DEV_KAFKA_PORT, DEV_KAFKA_CONTROLLER_PORT and DEV_PG_PORT choose the ports at `up`; the state
directory remembers them (ports.json), so later commands need only DEV_STATE_DIR, if that.

DEV_KAFKA_SECURITY=sasl_ssl (at the first `up` of a state directory, which remembers it) adds a
SASL_SSL listener on DEV_KAFKA_SASL_PORT (SCRAM-SHA-512, a certificate for 127.0.0.1/localhost
signed by a CA of its own: <state>/kafka/tls/ca.crt) and the standard authorizer.  The PLAINTEXT
listener stays, and its principal (User:ANONYMOUS) is the super user: tools and tests administer
the broker there, and only SASL_SSL clients are held to ACLs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
# DEV_STATE_DIR + the DEV_*_PORT variables give a second, independent pair of servers (e.g. to
# run chaos tests while other tests use the default pair).
STATE = Path(os.environ.get("DEV_STATE_DIR", ROOT / ".dev")).resolve()
# The ports this state directory's servers were last started with: `status`, `env`, `down` and
# the tests find them without the variables that chose them.
PORTS_FILE = STATE / "ports.json"


def recorded_ports() -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads(PORTS_FILE.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _port(key: str, default: int, *variables: str) -> int:
    """An explicit variable wins, then the port recorded in the state directory, then the default."""
    for var in variables:
        if os.environ.get(var):
            return int(os.environ[var])
    return recorded_ports().get(key, default)


def _record_ports(**ports: int) -> None:
    recorded = recorded_ports()
    if recorded.items() >= ports.items():
        return
    PORTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    tmp = PORTS_FILE.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**recorded, **ports}, indent=1, sort_keys=True) + "\n")
    tmp.replace(PORTS_FILE)


KAFKA_PORT = _port("kafka", 19092, "DEV_KAFKA_PORT")
KAFKA_CONTROLLER_PORT = _port("kafka_controller", 19093, "DEV_KAFKA_CONTROLLER_PORT")
# DEV_PG_FLAVOR=timescaledb: a second cluster, run by the locally built TimescaleDB's relocated
# PostgreSQL (see timescaledb_build), with its own data directory and default port.
PG_FLAVOR = os.environ.get("DEV_PG_FLAVOR", "postgres")
if PG_FLAVOR not in {"postgres", "timescaledb"}:
    raise SystemExit(f"DEV_PG_FLAVOR={PG_FLAVOR!r}: use postgres or timescaledb")
TIMESCALEDB = PG_FLAVOR == "timescaledb"
PG_PORT = _port(PG_FLAVOR, 55433 if TIMESCALEDB else 55432, "DEV_PG_PORT", "TIMESCALE_PORT")
PG_USER = os.environ.get("TIMESCALE_USER", "ts_user")
PG_PASSWORD = os.environ.get("TIMESCALE_PASSWORD", "ts_password")
PG_DB = os.environ.get("TIMESCALE_DB", "timeseries")


class ServiceError(RuntimeError):
    """A local service could not be installed or started; the message says why."""


def log(msg: str) -> None:
    print(f"[dev] {msg}", file=sys.stderr, flush=True)


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- Kafka


@dataclass(frozen=True)
class KafkaPaths:
    pom: Path = ROOT / "dev" / "kafka" / "pom.xml"
    libs: Path = CACHE / "kafka" / "libs"
    home: Path = STATE / "kafka"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def props(self) -> Path:
        return self.home / "server.properties"

    @property
    def log4j(self) -> Path:
        return self.home / "log4j2.properties"

    @property
    def logfile(self) -> Path:
        return self.home / "broker.log"

    @property
    def pidfile(self) -> Path:
        return self.home / "broker.pid"


KAFKA = KafkaPaths()
KAFKA_BOOTSTRAP = f"127.0.0.1:{KAFKA_PORT}"

_SERVER_PROPERTIES = """\
# Single-node KRaft broker + controller on loopback, written by dev/services.py.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests create and join many groups; the default 3 s delay would only slow them down.
group.initial.rebalance.delay.ms=0
# Abort the open transaction of a SIGKILLed sink within ~1 s of its timeout (default 10 s).
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
auto.create.topics.enable=true
delete.topic.enable=true
log.retention.hours=168
"""

# Rolled by size: the dev broker lives for days, and every restart logs a replay of the whole
# metadata log at INFO (the file reached 1.1 GB in one day of chaos tests).  At most 5 x 50 MB.
_LOG4J2 = """\
status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {logfile}
appender.file.filePattern = {logfile}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 4
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def _ensure_kafka_jars() -> None:
    marker = KAFKA.libs / ".complete"
    if marker.exists() and marker.read_text() == _pom_digest():
        return
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise ServiceError("Kafka needs Java 17+ and Maven on PATH (apt-get install openjdk-17-jre-headless maven)")
    log("resolving Apache Kafka jars from Maven Central (first run only)...")
    if KAFKA.libs.exists():
        shutil.rmtree(KAFKA.libs)
    KAFKA.libs.mkdir(parents=True)
    cmd = [
        "mvn", "-q", "-B", "-f", str(KAFKA.pom), "dependency:copy-dependencies",
        f"-DoutputDirectory={KAFKA.libs}", "-DincludeScope=runtime",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ServiceError(f"mvn dependency:copy-dependencies failed:\n{res.stdout}\n{res.stderr}")
    marker.write_text(_pom_digest())


def _pom_digest() -> str:
    return hashlib.sha256(KAFKA.pom.read_bytes()).hexdigest()


def _java(*args: str) -> list[str]:
    return ["java", "-cp", str(KAFKA.libs / "*"), *args]


def kafka_pid() -> int | None:
    """The local broker's process id, if it runs."""
    try:
        pid = int(KAFKA.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _kafka_ports() -> tuple[int, int]:
    """The ports this state directory's broker was started with (the ones asked for if unknown)."""
    rec = recorded_ports()
    return rec.get("kafka", KAFKA_PORT), rec.get("kafka_controller", KAFKA_CONTROLLER_PORT)


def kafka_running() -> bool:
    """This state directory's broker runs, on the ports asked for."""
    return (kafka_pid() is not None and _kafka_ports() == (KAFKA_PORT, KAFKA_CONTROLLER_PORT)
            and _running_security() == KAFKA_SECURITY and _port_open(KAFKA_PORT))


def _kafka_conflict() -> str | None:
    """Why the broker cannot start on the ports asked for, if it cannot; None if it runs there."""
    pid = kafka_pid()
    if pid is not None:
        ports = _kafka_ports()
        if ports == (KAFKA_PORT, KAFKA_CONTROLLER_PORT) and _running_security() == KAFKA_SECURITY:
            return None
        if ports == (KAFKA_PORT, KAFKA_CONTROLLER_PORT):
            return (f"the broker of {STATE} runs with DEV_KAFKA_SECURITY={_running_security()} (pid {pid}), not "
                    f"{KAFKA_SECURITY}: stop it first (services.py down) to change it")
        return (f"the broker of {STATE} runs on ports {ports[0]}/{ports[1]} (pid {pid}), not "
                f"{KAFKA_PORT}/{KAFKA_CONTROLLER_PORT}: stop it first (services.py down) to move it")
    for port, var in ((KAFKA_PORT, "DEV_KAFKA_PORT"), (KAFKA_CONTROLLER_PORT, "DEV_KAFKA_CONTROLLER_PORT"),
                      *(((KAFKA_SASL_PORT, "DEV_KAFKA_SASL_PORT"),) if KAFKA_SECURITY == "sasl_ssl" else ())):
        if _port_open(port):
            return f"port {port} is taken by another process, not the broker of {STATE}: set {var} to a free port"
    return None


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialise starts/stops across processes (parallel test sessions share the servers)."""
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def start_kafka(timeout: float = 90.0) -> str:
    """Start the broker if it is not running; returns the bootstrap address."""
    if kafka_running():
        _record_ports(kafka=KAFKA_PORT, kafka_controller=KAFKA_CONTROLLER_PORT)  # started before ports.json
        return KAFKA_BOOTSTRAP
    with _locked("kafka"):
        return _start_kafka(timeout)


def _start_kafka(timeout: float) -> str:
    if kafka_running():
        return KAFKA_BOOTSTRAP
    conflict = _kafka_conflict()
    if conflict:
        raise ServiceError(conflict)
    _ensure_kafka_jars()
    KAFKA.home.mkdir(parents=True, exist_ok=True)
    KAFKA.props.write_text(
        _SERVER_PROPERTIES.format(port=KAFKA_PORT, controller_port=KAFKA_CONTROLLER_PORT, data=KAFKA.data)
    )
    KAFKA.log4j.write_text(_LOG4J2.format(logfile=KAFKA.logfile))
    secure_properties = _kafka_secure_setup()
    if secure_properties:
        with open(KAFKA.props, "a") as f:
            f.write(secure_properties)
    if not (KAFKA.data / "meta.properties").exists():
        cluster_id = subprocess.run(
            _java("kafka.tools.StorageTool", "random-uuid"), capture_output=True, text=True, check=True
        ).stdout.strip()
        res = subprocess.run(
            _java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(KAFKA.props),
                  *_scram_format_args()),
            capture_output=True, text=True,
        )
        if res.returncode != 0:
            raise ServiceError(f"formatting KRaft storage failed:\n{res.stdout}\n{res.stderr}")
        _scram_formatted()
    start_mark = _log_mark(KAFKA.logfile)
    proc = launch_broker(KAFKA.home, KAFKA.props, KAFKA.log4j, os.environ.get("DEV_KAFKA_HEAP", "-Xms256m -Xmx768m"))
    KAFKA.pidfile.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"broker exited with {proc.returncode}; see {KAFKA.logfile} and broker.stdout")
        if _port_open(KAFKA_PORT) and _log_has(KAFKA.logfile, start_mark, "Kafka Server started"):
            _record_ports(kafka=KAFKA_PORT, kafka_controller=KAFKA_CONTROLLER_PORT, **_secure_ports())
            KAFKA_SECURITY_FILE.write_text(KAFKA_SECURITY)
            log(f"kafka up on {KAFKA_BOOTSTRAP} (pid {proc.pid})")
            return KAFKA_BOOTSTRAP
        time.sleep(0.2)
    raise ServiceError(f"broker did not start within {timeout:.0f}s; see {KAFKA.logfile}")


def launch_broker(home: Path, props: Path, log4j: Path, heap: str) -> subprocess.Popen[bytes]:
    """A Kafka JVM (from the cached jars) on `props`, in a session of its own, its stdout in
    home/broker.stdout.  The caller waits for it to serve."""
    cmd = ["java", *heap.split(), "-XX:+UseG1GC", "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={log4j}", "-cp", str(KAFKA.libs / "*"), "kafka.Kafka", str(props)]
    with open(home / "broker.stdout", "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=home)


def _log_mark(path: Path) -> tuple[int, int]:
    """Where the log ends now: (inode, size), or (0, 0) if there is none yet."""
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return (st.st_ino, st.st_size)


def _log_has(path: Path, mark: tuple[int, int], needle: str) -> bool:
    """Did the log get needle after mark?  A rolled file (a new inode) is read from its start."""
    try:
        with open(path, "rb") as f:
            inode = os.fstat(f.fileno()).st_ino
            f.seek(mark[1] if inode == mark[0] else 0)
            return needle.encode() in f.read()
    except OSError:
        return False


def stop_kafka(kill: bool = False, timeout: float = 60.0) -> None:
    """Stop the broker: SIGTERM (clean, waits) or SIGKILL (crash, for chaos tests)."""
    with _locked("kafka"):
        _stop_kafka(kill, timeout)


def _stop_kafka(kill: bool, timeout: float) -> None:
    pid = kafka_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    _wait_gone(pid, timeout)
    # A killed JVM's leader thread turns zombie before its other threads have exited and its
    # sockets are closed: wait for the port too, or a quick restart finds it still taken.
    deadline = time.monotonic() + 30
    while any(_port_open(port) for port in _kafka_ports()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if kill:
        # The port is freed with the process; nothing else to clean: restart recovers the logs.
        log(f"kafka killed (pid {pid})")
    else:
        log("kafka stopped")


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)


# --------------------------------------------------------------------------- Kafka security (opt-in)

# "plaintext" (the default: one PLAINTEXT listener, no authorizer) or "sasl_ssl".
KAFKA_SECURITY_FILE = STATE / "kafka" / "security"
KAFKA_SECURITY = os.environ.get("DEV_KAFKA_SECURITY", "").lower() or (
    KAFKA_SECURITY_FILE.read_text().strip() if KAFKA_SECURITY_FILE.exists() else "plaintext")
if KAFKA_SECURITY not in {"plaintext", "sasl_ssl"}:
    raise SystemExit(f"DEV_KAFKA_SECURITY={KAFKA_SECURITY!r}: use plaintext or sasl_ssl")
KAFKA_SASL_PORT = _port("kafka_sasl", 19094, "DEV_KAFKA_SASL_PORT")
KAFKA_SASL_BOOTSTRAP = f"127.0.0.1:{KAFKA_SASL_PORT}"
KAFKA_TLS = STATE / "kafka" / "tls"
# A SCRAM-SHA-512 user made when the storage is formatted; tests add their own (admin API).
DEV_SASL_USER = "sink"
DEV_SASL_PASSWORD = "sink-secret"
# Loopback-only development keystores: the password guards nothing, so it is fixed.
_STORE_PASSWORD = "dev-keystore"

_SECURE_PROPERTIES = """\
# DEV_KAFKA_SECURITY=sasl_ssl: a SASL_SSL listener beside PLAINTEXT (these keys override the above).
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port},SASL_SSL://127.0.0.1:{sasl_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{sasl_port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location={tls}/broker.p12
listener.name.sasl_ssl.ssl.keystore.password={password}
listener.name.sasl_ssl.ssl.key.password={password}
listener.name.sasl_ssl.ssl.truststore.type=PKCS12
listener.name.sasl_ssl.ssl.truststore.location={tls}/truststore.p12
listener.name.sasl_ssl.ssl.truststore.password={password}
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
# PLAINTEXT and CONTROLLER authenticate no one; their principal administers the broker.
super.users=User:ANONYMOUS
allow.everyone.if.no.acl.found=false
"""


def _running_security() -> str:
    """The mode the running (or last started) broker of this state directory was started in."""
    try:
        return KAFKA_SECURITY_FILE.read_text().strip()
    except OSError:
        return "plaintext"


def _secure_ports() -> dict[str, int]:
    return {"kafka_sasl": KAFKA_SASL_PORT} if KAFKA_SECURITY == "sasl_ssl" else {}


def _kafka_secure_setup() -> str:
    """In sasl_ssl mode: the TLS material (made once) and the properties to append; else ""."""
    if KAFKA_SECURITY != "sasl_ssl":
        return ""
    if (KAFKA.data / "meta.properties").exists() and not (KAFKA.home / "scram-formatted").exists():
        # SCRAM users are written when the storage is formatted (nothing in the stdlib can add them later).
        raise ServiceError(f"DEV_KAFKA_SECURITY=sasl_ssl needs a broker formatted with it: use a new "
                           f"DEV_STATE_DIR, or `services.py down` and remove {KAFKA.data}")
    _ensure_kafka_tls()
    return _SECURE_PROPERTIES.format(port=KAFKA_PORT, controller_port=KAFKA_CONTROLLER_PORT, sasl_port=KAFKA_SASL_PORT,
                                     tls=KAFKA_TLS, password=_STORE_PASSWORD)


def _scram_format_args() -> list[str]:
    if KAFKA_SECURITY != "sasl_ssl":
        return []
    return ["--add-scram", f"SCRAM-SHA-512=[name={DEV_SASL_USER},password={DEV_SASL_PASSWORD}]"]


def _scram_formatted() -> None:
    if KAFKA_SECURITY == "sasl_ssl":
        (KAFKA.home / "scram-formatted").write_text(DEV_SASL_USER + "\n")


def _ensure_kafka_tls() -> None:
    """A CA (openssl) and the broker's PKCS12 keystore and truststore (keytool), made once.
    The broker's certificate names localhost and 127.0.0.1, so clients verify the host name."""
    if (KAFKA_TLS / ".complete").exists():
        return
    for tool in ("keytool", "openssl"):
        if shutil.which(tool) is None:
            raise ServiceError(f"DEV_KAFKA_SECURITY=sasl_ssl needs {tool} on PATH (a JDK; openssl)")
    if KAFKA_TLS.exists():
        shutil.rmtree(KAFKA_TLS)  # half made by an interrupted run
    KAFKA_TLS.mkdir(parents=True)
    store = ["-storetype", "PKCS12", "-storepass", _STORE_PASSWORD]
    san = "SAN=dns:localhost,ip:127.0.0.1"
    (KAFKA_TLS / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    steps = [
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-keyout", "ca.key",
         "-out", "ca.crt", "-subj", "/CN=kafka-timescale-sink dev CA"],
        ["keytool", "-genkeypair", "-keystore", "broker.p12", *store, "-alias", "broker", "-keyalg", "RSA",
         "-keysize", "2048", "-validity", "3650", "-dname", "CN=localhost", "-ext", san],
        ["keytool", "-certreq", "-keystore", "broker.p12", *store, "-alias", "broker", "-ext", san,
         "-file", "broker.csr"],
        ["openssl", "x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", "3650", "-extfile", "san.ext", "-out", "broker.crt"],
    ]
    for cmd in steps:
        _tls_step(cmd)
    # The signed certificate with its CA: keytool takes the chain as the reply to its request.
    (KAFKA_TLS / "chain.crt").write_text((KAFKA_TLS / "broker.crt").read_text() + (KAFKA_TLS / "ca.crt").read_text())
    _tls_step(["keytool", "-importcert", "-keystore", "broker.p12", *store, "-alias", "broker", "-file", "chain.crt",
               "-noprompt"])
    _tls_step(["keytool", "-importcert", "-keystore", "truststore.p12", *store, "-alias", "ca", "-file", "ca.crt",
               "-noprompt"])
    (KAFKA_TLS / ".complete").write_text("")


def _tls_step(cmd: list[str]) -> None:
    res = subprocess.run(cmd, cwd=KAFKA_TLS, capture_output=True, text=True)
    if res.returncode != 0:
        raise ServiceError(f"{cmd[0]} {cmd[1]} failed (making the broker's TLS material):\n{res.stdout}\n{res.stderr}")


def kafka_sasl_env(user: str = DEV_SASL_USER, password: str = DEV_SASL_PASSWORD) -> dict[str, str]:
    """The sink's Kafka variables for the SASL_SSL listener, as `user`."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": KAFKA_SASL_BOOTSTRAP,
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": user,
        "KAFKA_SASL_PASSWORD": password,
        "KAFKA_SSL_CA_LOCATION": str(KAFKA_TLS / "ca.crt"),
    }


# --------------------------------------------------------------------------- PostgreSQL


def timescaledb_build() -> Path | None:
    """The newest TimescaleDB build: a relocated copy of Debian's PostgreSQL with the extension
    installed, at .cache/timescaledb/pg<version>-tsdb<version>/ (marked complete by `.built`),
    or $DEV_TIMESCALEDB_HOME.  Never made by this project's files (TimescaleDB's source and
    binaries stay out of the repository); None when there is none, as in CI."""
    override = os.environ.get("DEV_TIMESCALEDB_HOME")
    candidates = [Path(override)] if override else sorted(CACHE.glob("timescaledb/*/.built"))
    for marker in reversed(candidates):
        home = marker if override else marker.parent
        found = sorted(home.glob("usr/lib/postgresql/*/bin/pg_ctl"))
        if found and list(home.glob("usr/lib/postgresql/*/lib/timescaledb.so")):
            return found[-1].parent
    return None


def _pg_bindir() -> Path | None:
    if TIMESCALEDB:
        return timescaledb_build()
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if candidates:
        return candidates[-1].parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _ensure_pg_installed() -> Path:
    bindir = _pg_bindir()
    if bindir is not None:
        return bindir
    if TIMESCALEDB:
        raise ServiceError(f"DEV_PG_FLAVOR=timescaledb but no TimescaleDB build under {CACHE / 'timescaledb'}")
    if os.geteuid() != 0:
        raise ServiceError("PostgreSQL is not installed; run: sudo apt-get install -y postgresql")
    log("installing Debian's postgresql package...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    res = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "postgresql"],
                         env=env, capture_output=True, text=True)
    if res.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        res = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "postgresql"],
                             env=env, capture_output=True, text=True)
    bindir = _pg_bindir()
    if res.returncode != 0 or bindir is None:
        raise ServiceError(f"apt-get install postgresql failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return bindir


def _run_as() -> str | None:
    """PostgreSQL refuses to run as root: as root we run it as the `postgres` user."""
    return "postgres" if os.geteuid() == 0 else None


def pg_home() -> Path:
    """The project's cluster folder; outside the repo if the postgres user cannot reach it."""
    override = os.environ.get("DEV_PG_HOME")
    if override:
        return Path(override)
    home = STATE / ("pg-timescaledb" if TIMESCALEDB else "pg")
    user = _run_as()
    if user is None:
        return home
    # The state directory's nearest existing folder: DEV_STATE_DIR may be anywhere (a test's tmp).
    existing = next(p for p in (STATE, *STATE.parents) if p.exists())
    probe = subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(existing)], capture_output=True)
    if probe.returncode == 0:
        return home
    digest = hashlib.sha256(str(STATE).encode()).hexdigest()[:10]
    return Path(f"/var/tmp/kafka-timescale-sink-{digest}") / home.name


def _as_pg_user(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    user = _run_as()
    full = ["runuser", "-u", user, "--", *cmd] if user else cmd
    res: subprocess.CompletedProcess[str] = subprocess.run(full, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    return res


def _pg_paths() -> tuple[Path, Path, Path]:
    home = pg_home()
    return home, home / "data", home / "run"


def pg_postmaster() -> tuple[int, int] | None:
    """(pid, port) of this state directory's cluster, if it runs (from its postmaster.pid)."""
    _, data, _ = _pg_paths()
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    return (pid, port) if pid_alive(pid) else None


def pg_running() -> bool:
    """This state directory's cluster runs, on the port asked for."""
    bindir = _pg_bindir()
    if bindir is None:
        return False
    _, data, _ = _pg_paths()
    if not (data / "PG_VERSION").exists():
        return False
    running = _as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "status"]).returncode == 0
    postmaster = pg_postmaster()
    return running and postmaster is not None and postmaster[1] == PG_PORT


def _pg_conflict() -> str | None:
    """Why the cluster cannot start on the port asked for, if it cannot; None if it runs there."""
    postmaster = pg_postmaster()
    if postmaster is not None:
        pid, port = postmaster
        if port == PG_PORT:
            return None
        return (f"the {PG_FLAVOR} cluster of {STATE} runs on port {port} (pid {pid}), not {PG_PORT}: "
                "stop it first (services.py down) to move it")
    if _port_open(PG_PORT):
        return f"port {PG_PORT} is taken by another process, not the {PG_FLAVOR} cluster of {STATE}: set DEV_PG_PORT"
    return None


def preflight() -> None:
    """Before any install or start: every port this state directory's servers need is free or
    already theirs.  Raises ServiceError naming each conflict and the variable that moves it."""
    problems = [p for p in (_kafka_conflict(), _pg_conflict()) if p]
    if problems:
        raise ServiceError("; ".join(problems))


def start_postgres(timeout: float = 60.0) -> str:
    """Start the project's cluster if needed, create role + database; returns a conninfo."""
    with _locked(PG_FLAVOR):
        return _start_postgres(timeout)


def _start_postgres(timeout: float) -> str:
    conflict = _pg_conflict()
    if conflict:
        raise ServiceError(conflict)
    bindir = _ensure_pg_installed()
    home, data, run = _pg_paths()
    user = _run_as()
    if not (data / "PG_VERSION").exists():
        home.mkdir(parents=True, exist_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(home, user)
            shutil.chown(run, user)
        res = _as_pg_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                           "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256"])
        if res.returncode != 0:
            raise ServiceError(f"initdb failed:\n{res.stdout}\n{res.stderr}")
        with open(data / "postgresql.conf", "a") as f:
            f.write(
                "\n# dev/services.py\n"
                f"listen_addresses = '127.0.0.1'\nport = {PG_PORT}\n"
                f"unix_socket_directories = '{run}'\n"
                "max_connections = 200\nshared_buffers = 256MB\n"
                "logging_collector = off\n"
            )
            if TIMESCALEDB:
                # Every database with the extension takes a scheduler worker, each running job one more.
                f.write("shared_preload_libraries = 'timescaledb'\nmax_worker_processes = 32\n"
                        "timescaledb.max_background_workers = 24\ntimescaledb.telemetry_level = off\n")
    if not pg_running():
        # -p: the port asked for now, not the one initdb wrote into postgresql.conf.
        res = _as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(home / "postgres.log"),
                           "-o", f"-p {PG_PORT}", "-w", "-t", str(int(timeout)), "start"])
        if res.returncode != 0:
            raise ServiceError(f"pg_ctl start failed:\n{res.stdout}\n{res.stderr}\nsee {home / 'postgres.log'}")
        log(f"{PG_FLAVOR} up on 127.0.0.1:{PG_PORT} ({data})")
    _record_ports(**{PG_FLAVOR: PG_PORT})
    _ensure_role_and_db(bindir)
    return conninfo()


def _psql_admin(bindir: Path, sql: str, db: str = "postgres") -> str:
    _, _, run = _pg_paths()
    res = _as_pg_user([str(bindir / "psql"), "-h", str(run), "-p", str(PG_PORT), "-U", "postgres",
                       "-d", db, "-v", "ON_ERROR_STOP=1", "-tAc", sql])
    if res.returncode != 0:
        raise ServiceError(f"psql failed: {res.stderr.strip()}")
    return res.stdout.strip()


def _quote_literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _quote_ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _ensure_role_and_db(bindir: Path) -> None:
    if _psql_admin(bindir, f"SELECT 1 FROM pg_roles WHERE rolname = {_quote_literal(PG_USER)}") != "1":
        _psql_admin(bindir, f"CREATE ROLE {_quote_ident(PG_USER)} LOGIN PASSWORD {_quote_literal(PG_PASSWORD)}")
    if _psql_admin(bindir, f"SELECT 1 FROM pg_database WHERE datname = {_quote_literal(PG_DB)}") != "1":
        _psql_admin(bindir, f"CREATE DATABASE {_quote_ident(PG_DB)} OWNER {_quote_ident(PG_USER)}")


def psql_admin(sql: str, db: str | None = None) -> str:
    """Run SQL as the cluster superuser (tests use it for pg_terminate_backend and such)."""
    bindir = _pg_bindir()
    if bindir is None:
        raise ServiceError("PostgreSQL is not installed")
    return _psql_admin(bindir, sql, db or PG_DB)


def psql_admin_script(script: str, variables: dict[str, str], db: str | None = None) -> str:
    """Run a psql script (stdin) with psql variables (``--set name=value``) as the cluster
    superuser, as the TimescaleDB image runs its initialisation scripts."""
    bindir = _pg_bindir()
    if bindir is None:
        raise ServiceError("PostgreSQL is not installed")
    _, _, run = _pg_paths()
    sets = [arg for name, value in variables.items() for arg in ("--set", f"{name}={value}")]
    res = _as_pg_user([str(bindir / "psql"), "--no-psqlrc", "-h", str(run), "-p", str(PG_PORT), "-U", "postgres",
                       "-d", db or PG_DB, "-v", "ON_ERROR_STOP=1", "-tA", *sets], input=script)
    if res.returncode != 0:
        raise ServiceError(f"psql script failed: {res.stderr.strip()}")
    return res.stdout.strip()


def stop_postgres(mode: str = "fast", timeout: float = 60.0) -> None:
    """pg_ctl stop with mode fast (clean) or immediate (crash-like, for chaos tests)."""
    with _locked(PG_FLAVOR):
        _stop_postgres(mode, timeout)


def _stop_postgres(mode: str, timeout: float) -> None:
    bindir = _pg_bindir()
    if bindir is None or pg_postmaster() is None:  # on whichever port it runs
        return
    _, data, _ = _pg_paths()
    res = _as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "-t", str(int(timeout)), "stop"])
    if res.returncode != 0:
        raise ServiceError(f"pg_ctl stop failed: {res.stderr.strip()}")
    log(f"{PG_FLAVOR} stopped ({mode})")


def conninfo(user: str = PG_USER, password: str = PG_PASSWORD, db: str | None = None) -> str:
    # PG_DB read at call time: the test suite points it at a database of its own.
    return f"host=127.0.0.1 port={PG_PORT} dbname={db or PG_DB} user={user} password={password}"


def service_env() -> dict[str, str]:
    """The sink's env vars pointing at the local services."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": KAFKA_BOOTSTRAP,
        "TIMESCALE_HOST": "127.0.0.1",
        "TIMESCALE_PORT": str(PG_PORT),
        "TIMESCALE_DB": PG_DB,
        "TIMESCALE_USER": PG_USER,
        "TIMESCALE_PASSWORD": PG_PASSWORD,
    }


# --------------------------------------------------------------------------- CLI


def status_lines() -> list[str]:
    """Each server of this state directory: ours and running (where), or stopped, and then
    whether someone else's process holds its port."""
    lines = [f"state    {STATE}"]
    pid = kafka_pid()
    if pid is not None:
        port, controller = _kafka_ports()
        lines.append(f"kafka    running (ours, pid {pid})  127.0.0.1:{port} (controller {controller})")
        if _running_security() == "sasl_ssl":
            sasl_port = recorded_ports().get("kafka_sasl")
            lines.append(f"kafka    SASL_SSL 127.0.0.1:{sasl_port} (CA {KAFKA_TLS / 'ca.crt'})")
    else:
        lines.append(f"kafka    stopped  127.0.0.1:{KAFKA_PORT}{_taken(KAFKA_PORT, KAFKA_CONTROLLER_PORT)}")
    postmaster = pg_postmaster()
    if postmaster is not None:
        lines.append(f"{PG_FLAVOR} running (ours, pid {postmaster[0]})  127.0.0.1:{postmaster[1]} ({pg_home()})")
    else:
        lines.append(f"{PG_FLAVOR} stopped  127.0.0.1:{PG_PORT}{_taken(PG_PORT)} ({pg_home()})")
    return lines


def _taken(*ports: int) -> str:
    taken = [str(p) for p in ports if _port_open(p)]
    return f"; port {', '.join(taken)} in use by someone else's process" if taken else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "status", "env", "check"])
    args = ap.parse_args(argv)
    try:
        if args.action in {"up", "check"}:
            preflight()  # in seconds, before any install
        if args.action == "up":
            start_kafka()
            start_postgres()
        elif args.action == "down":
            stop_kafka()
            stop_postgres()
        elif args.action == "status":
            print("\n".join(status_lines()))
        elif args.action == "env":
            for k, v in service_env().items():
                print(f"export {k}={v}")
            if KAFKA_SECURITY == "sasl_ssl":
                print("# the SASL_SSL listener, as a principal with ACLs:")
                print("\n".join(f"# export {k}={v}" for k, v in kafka_sasl_env().items()))
    except ServiceError as e:
        print(f"[dev] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
