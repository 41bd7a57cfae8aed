"""A local 3-node KRaft Kafka cluster on loopback, for chaos tests of broker failover.

Standard library only, like dev/services.py, whose jar cache, Java launcher, locking and log
helpers it uses: the same cached jars, its own ports and state.  Three combined
broker+controller nodes (a three-voter controller quorum), replication factor 3 and
min.insync.replicas=2 for the internal topics and for topics created without a factor.

    python3 -m dev.cluster up        # start the three nodes (idempotent)
    python3 -m dev.cluster down      # clean stop of all three
    python3 -m dev.cluster status    # each node, and the controller quorum
    python3 -m dev.cluster env       # KAFKA_BOOTSTRAP_SERVERS for the sink

State lives in `<DEV_STATE_DIR>/cluster/node<i>/`.  DEV_CLUSTER_PORT (default 19100) is the base
of the ports, recorded in ports.json like the single node's; node i (1-3) listens on
base+i (clients and replication), base+10+i (controller) and base+20+i (PROXIED: advertised as
base+30+i, where a test puts a TCP proxy to cut the node off from clients).  DEV_CLUSTER_HEAP
(default -Xms128m -Xmx384m) sizes each node's heap.  The single node stays the default for
everything else.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `dev` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dev import services
from dev.kafka_wire import Quorum, WireError, describe_quorum

NODES = (1, 2, 3)
HOST = "127.0.0.1"
HOME = services.STATE / "cluster"
BASE_PORT = services._port("cluster", 19100, "DEV_CLUSTER_PORT")


@dataclass(frozen=True)
class Node:
    """One combined broker+controller node: its ports and files."""

    id: int
    base: int = BASE_PORT

    @property
    def port(self) -> int:
        return self.base + self.id

    @property
    def controller_port(self) -> int:
        return self.base + 10 + self.id

    @property
    def proxied_port(self) -> int:
        """The PROXIED listener: the node's own end of a test's TCP proxy."""
        return self.base + 20 + self.id

    @property
    def proxy_port(self) -> int:
        """Where the PROXIED listener is advertised: a test's TCP proxy listens here."""
        return self.base + 30 + self.id

    @property
    def home(self) -> Path:
        return HOME / f"node{self.id}"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def props(self) -> Path:
        return self.home / "server.properties"

    @property
    def logfile(self) -> Path:
        return self.home / "broker.log"

    @property
    def pidfile(self) -> Path:
        return self.home / "broker.pid"

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def node(node_id: int) -> Node:
    if node_id not in NODES:
        raise ValueError(f"no node {node_id}: the cluster has nodes {NODES}")
    return Node(node_id)


def bootstrap() -> str:
    """Every node's client listener: a client reaches the cluster while any one of them runs."""
    return ",".join(node(i).address for i in NODES)


def proxied_bootstrap() -> str:
    """Every node through its TCP proxy: a client bootstrapped here is sent to the proxies only."""
    return ",".join(f"{HOST}:{node(i).proxy_port}" for i in NODES)


_SERVER_PROPERTIES = """\
# Node {id} of a 3-node KRaft cluster on loopback (combined broker + controller), written by dev/cluster.py.
process.roles=broker,controller
node.id={id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://{host}:{port},PROXIED://{host}:{proxied_port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port},PROXIED://{host}:{proxy_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,PROXIED:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions=3
default.replication.factor=3
min.insync.replicas=2
unclean.leader.election.enable=false
offsets.topic.replication.factor=3
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
auto.create.topics.enable=true
delete.topic.enable=true
# Three JVMs share a small machine: few threads, and a log cleaner buffer that fits a small heap
# (its default, 128 MB, would take a third of it).
num.network.threads=2
num.io.threads=2
background.threads=2
num.replica.fetchers=1
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=16777216
"""


def _node_pid(n: Node) -> int | None:
    try:
        pid = int(n.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if services.pid_alive(pid) else None


def node_pid(node_id: int) -> int | None:
    """The node's JVM process id, if it runs."""
    return _node_pid(node(node_id))


def node_running(node_id: int) -> bool:
    n = node(node_id)
    return _node_pid(n) is not None and services._port_open(n.port)


def running_nodes() -> list[int]:
    return [i for i in NODES if node_running(i)]


def _ports(n: Node) -> tuple[int, ...]:
    return n.port, n.controller_port, n.proxied_port


def _conflicts() -> list[str]:
    """Ports of stopped nodes that another process holds; a recorded base other than the one
    asked for while nodes run."""
    recorded = services.recorded_ports().get("cluster")
    if recorded is not None and recorded != BASE_PORT and any(_node_pid(Node(i, recorded)) for i in NODES):
        return [f"the cluster of {services.STATE} runs on base port {recorded}, not {BASE_PORT}: "
                "stop it first (dev.cluster down) to move it"]
    out = []
    for i in NODES:
        n = node(i)
        if _node_pid(n) is not None:
            continue
        taken = [p for p in _ports(n) if services._port_open(p)]
        if taken:
            out.append(f"port(s) {taken} of node {i} taken by another process: set DEV_CLUSTER_PORT to a free base")
    return out


def _cluster_id() -> str:
    """The cluster's id, made once (what `kafka-storage random-uuid` prints, without a JVM)."""
    path = HOME / "cluster.id"
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    while True:
        cid = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not cid.startswith("-"):  # as Kafka's own: an id must not look like an option
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cid + "\n")
    return cid


def _write_config(n: Node) -> None:
    n.home.mkdir(parents=True, exist_ok=True)
    voters = ",".join(f"{i}@{HOST}:{node(i).controller_port}" for i in NODES)
    n.props.write_text(_SERVER_PROPERTIES.format(
        id=n.id, voters=voters, host=HOST, port=n.port, proxied_port=n.proxied_port,
        controller_port=n.controller_port, proxy_port=n.proxy_port, data=n.data))
    (n.home / "log4j2.properties").write_text(services._LOG4J2.format(logfile=n.logfile))


def _format(nodes: list[Node]) -> None:
    """Format the storage of the nodes that have none (in parallel: one JVM start each)."""
    todo = [n for n in nodes if not (n.data / "meta.properties").exists()]
    cid = _cluster_id()
    procs = [(n, subprocess.Popen(services._java("kafka.tools.StorageTool", "format", "-t", cid, "-c", str(n.props)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for n in todo]
    for n, proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise services.ServiceError(f"formatting node {n.id} failed:\n{out}")


def _launch(n: Node) -> tuple[subprocess.Popen[bytes], tuple[int, int]]:
    mark = services._log_mark(n.logfile)
    proc = services.launch_broker(n.home, n.props, n.home / "log4j2.properties",
                                  os.environ.get("DEV_CLUSTER_HEAP", "-Xms128m -Xmx384m"))
    n.pidfile.write_text(str(proc.pid))
    return proc, mark


def _await_started(started: list[tuple[Node, subprocess.Popen[bytes], tuple[int, int]]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(started)
    while waiting and time.monotonic() < deadline:
        for item in list(waiting):
            n, proc, mark = item
            if proc.poll() is not None:
                if not services._log_has(n.logfile, mark, "Address already in use"):
                    raise services.ServiceError(f"node {n.id} exited with {proc.returncode}; see {n.logfile}")
                # The ports lie in Linux's ephemeral range (32768-60999): any client connection on
                # the machine may hold one for a moment, or leave it in TIME_WAIT for 60 s.
                services.log(f"cluster node {n.id}: a port of its is taken for now; starting it again in 5s")
                time.sleep(5)
                waiting[waiting.index(item)] = (n, *_launch(n))
                continue
            if services._port_open(n.port) and services._log_has(n.logfile, mark, "Kafka Server started"):
                services.log(f"cluster node {n.id} up on {n.address} (pid {proc.pid})")
                waiting.remove(item)
        time.sleep(0.2)
    if waiting:
        raise services.ServiceError(f"node(s) {[n.id for n, _, _ in waiting]} did not start within {timeout:.0f}s; "
                                    f"see {[str(n.logfile) for n, _, _ in waiting]}")


def start(timeout: float = 120.0, only: tuple[int, ...] = NODES) -> str:
    """Start every node (of `only`) that is not running, all at once: a node finishes starting
    only once a majority of the quorum is up.  Returns the bootstrap address."""
    with services._locked("cluster"):
        todo = [node(i) for i in only if not node_running(i)]
        if not todo:
            services._record_ports(cluster=BASE_PORT)  # started before ports.json
            return bootstrap()
        problems = _conflicts()
        if problems:
            raise services.ServiceError("; ".join(problems))
        services._ensure_kafka_jars()
        for n in todo:
            _write_config(n)
        _format(todo)
        _await_started([(n, *_launch(n)) for n in todo], timeout)
        services._record_ports(cluster=BASE_PORT)
    return bootstrap()


def start_node(node_id: int, timeout: float = 120.0) -> None:
    """Start one node (after stop_node) and wait until it serves clients again."""
    start(timeout, only=(node(node_id).id,))


def stop_node(node_id: int, kill: bool = False, timeout: float = 60.0) -> None:
    """SIGTERM (a clean, controlled shutdown: leadership moves away first) or SIGKILL (a crash)."""
    with services._locked("cluster"):
        _stop(node(node_id), kill, timeout)


def _stop(n: Node, kill: bool, timeout: float) -> None:
    pid = _node_pid(n)
    if pid is None:
        return
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    services._wait_gone(pid, timeout)
    # A killed JVM's sockets can outlive its main thread for a moment: a quick restart needs them.
    deadline = time.monotonic() + 30
    while any(services._port_open(p) for p in _ports(n)) and time.monotonic() < deadline:
        time.sleep(0.1)
    services.log(f"cluster node {n.id} {'killed' if kill else 'stopped'} (pid {pid})")


def stop(timeout: float = 60.0) -> None:
    """Stop every node, all at once (one by one, the last ones would wait for a lost quorum)."""
    with services._locked("cluster"):
        pids = [(n, _node_pid(n)) for n in (node(i) for i in NODES)]
        for _, pid in pids:
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
        for n, pid in pids:
            if pid is not None:
                _stop(n, kill=False, timeout=timeout)


def quorum(timeout: float = 5.0) -> Quorum:
    """The controller quorum as the active controller sees it, asked of any running node."""
    errors = []
    for i in running_nodes():
        try:
            return describe_quorum(HOST, node(i).port, timeout)
        except (OSError, WireError) as e:
            errors.append(f"node {i}: {e}")
    raise services.ServiceError(f"no node answered DescribeQuorum: {errors or 'none runs'}")


def active_controller() -> int:
    """The node id of the active controller (the quorum's leader)."""
    return quorum().leader_id


def rss_kib() -> dict[int, int]:
    """Resident memory of each running node's JVM."""
    out = {}
    for i in NODES:
        pid = node_pid(i)
        if pid is None:
            continue
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out[i] = int(line.split()[1])
    return out


def status_lines() -> list[str]:
    lines = [f"state    {HOME}"]
    rss = rss_kib()
    for i in NODES:
        n = node(i)
        pid = _node_pid(n)
        if pid is None:
            lines.append(f"node {i}   stopped  {n.address}")
        else:
            lines.append(f"node {i}   running (pid {pid}, {rss.get(i, 0) // 1024} MiB)  {n.address} "
                         f"(controller {n.controller_port}, proxied {n.proxied_port} as {n.proxy_port})")
    if running_nodes():
        try:
            q = quorum()
            lines.append(f"quorum   leader {q.leader_id} epoch {q.leader_epoch} high watermark {q.high_watermark} "
                         f"lag {q.lag()}")
        except services.ServiceError as e:
            lines.append(f"quorum   {e}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "status", "env"])
    args = ap.parse_args(argv)
    try:
        if args.action == "up":
            t0 = time.monotonic()
            start()
            rss = [k // 1024 for k in rss_kib().values()]
            services.log(f"cluster up in {time.monotonic() - t0:.1f}s, RSS MiB {rss}")
        elif args.action == "down":
            stop()
        elif args.action == "status":
            print("\n".join(status_lines()))
        elif args.action == "env":
            print(f"export KAFKA_BOOTSTRAP_SERVERS={bootstrap()}")
    except services.ServiceError as e:
        print(f"[dev] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
