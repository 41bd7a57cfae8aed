"""The 3-node cluster in chaos scenarios: who leads what, waiting until it is in sync, stopping
and starting nodes, and cutting one node off from clients behind TCP proxies."""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import ElectionType, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]  # missing from the stub

from chaos_tests.harness import Fault, Scenario
from chaos_tests.records import Planned
from dev import cluster, testkit
from dev.kafka_wire import WireError, find_transaction_coordinator
from dev.proxy import TcpProxy

# A voter this many metadata records behind the quorum's high watermark counts as caught up: the
# active controller appends a record every half second, so "0" is a moving target.
QUORUM_LAG_OK = 20


@dataclass(frozen=True)
class Roles:
    """Which node does what for one scenario's topic, group and transactional id."""

    leaders: dict[int, int]  # input partition -> leader node
    group_coordinator: int
    transaction_coordinator: int
    controller: int

    def busiest_leader(self) -> int:
        """The node leading the most input partitions (the lowest id of a tie)."""
        counts = Counter(self.leaders.values())
        return min(counts, key=lambda n: (-counts[n], n))

    def of(self, node_id: int) -> str:
        """What a node is, in words, for the scenario's log and summary."""
        parts = [f"leader of {sorted(p for p, n in self.leaders.items() if n == node_id)}"]
        if node_id == self.group_coordinator:
            parts.append("group coordinator")
        if node_id == self.transaction_coordinator:
            parts.append("transaction coordinator")
        if node_id == self.controller:
            parts.append("active controller")
        return f"node {node_id} (" + ", ".join(parts) + ")"


def _admin() -> AdminClient:
    return AdminClient({"bootstrap.servers": cluster.bootstrap(), "log_level": 2})


def leaders(topic: str) -> dict[int, int]:
    md = _admin().list_topics(topic, timeout=10)
    return {p: pm.leader for p, pm in md.topics[topic].partitions.items()}


def group_coordinator(group: str, timeout: float = 30) -> int:
    """The group's coordinator (found by the Admin API even before the group has members).
    The first call on a new cluster creates __consumer_offsets (NOT_COORDINATOR meanwhile)."""
    def ask() -> int | None:
        adm = _admin()  # keep a reference: a destroyed handle fails its futures
        try:
            desc = adm.describe_consumer_groups([group], request_timeout=10)[group].result(timeout=15)
        except KafkaException:
            return None
        return int(desc.coordinator.id)

    found: int = testkit.wait_for(ask, timeout, interval=0.5, what=f"the coordinator of group {group}")
    return found


def transaction_coordinator(transactional_id: str, timeout: float = 30) -> int:
    """FindCoordinator for a transactional id (confluent-kafka has no describe_transactions).
    The first call after start-up creates __transaction_state: retried until it answers."""
    def ask() -> int | None:
        for i in cluster.running_nodes():
            with contextlib.suppress(OSError, WireError):
                return find_transaction_coordinator(cluster.HOST, cluster.node(i).port, transactional_id)
        return None

    found: int = testkit.wait_for(ask, timeout, interval=0.5, what=f"the coordinator of {transactional_id}")
    return found


def roles(topic: str, group: str, transactional_id: str) -> Roles:
    return Roles(leaders(topic), group_coordinator(group), transaction_coordinator(transactional_id),
                 cluster.active_controller())


def transactional_id_apart(group: str, avoid: set[int]) -> str:
    """A transactional id whose coordinator is none of the nodes in `avoid` (e.g. the group
    coordinator's): a fault then hits one coordinator, not both at once."""
    for k in range(200):
        tid = f"{group}.tx{k}"
        if transaction_coordinator(tid) not in avoid:
            return tid
    raise AssertionError(f"no transactional id found whose coordinator avoids nodes {avoid}")


def out_of_sync() -> list[str]:
    """Why the cluster is not fully in sync, as an operator checks between restart steps
    (empty: in sync): every node running and registered, every partition of every topic
    (internal ones too) with all three replicas in sync and a leader, every controller caught up."""
    down = [i for i in cluster.NODES if not cluster.node_running(i)]
    if down:
        return [f"node(s) {down} not running"]
    problems = []
    adm = _admin()
    nodes = adm.describe_cluster(request_timeout=10).result(timeout=15).nodes
    if len(nodes) != len(cluster.NODES):
        problems.append(f"{len(nodes)} brokers registered")
    md = adm.list_topics(timeout=10)
    for t, tm in md.topics.items():
        for p, pm in tm.partitions.items():
            if pm.leader < 0 or sorted(pm.isrs) != sorted(pm.replicas) or len(pm.replicas) != len(cluster.NODES):
                problems.append(f"{t}/{p} leader {pm.leader} replicas {pm.replicas} isr {pm.isrs}")
    lag = cluster.quorum().lag()
    if any(v < 0 or v > QUORUM_LAG_OK for v in lag.values()) or len(lag) != len(cluster.NODES):
        problems.append(f"controller quorum lag {lag}")
    return problems


def _off_preferred_leader() -> list[TopicPartition]:
    """Partitions led by a replica other than their first (a node restarted hands its leadership
    to the others and gets it back only by a preferred leader election)."""
    md = _admin().list_topics(timeout=10)
    return [TopicPartition(t, p) for t, tm in md.topics.items() for p, pm in tm.partitions.items()
            if pm.replicas and pm.leader != pm.replicas[0]]


def wait_in_sync(timeout: float = 120) -> float:
    """Until out_of_sync() is empty, and then every partition is back on its preferred leader
    (elected as `kafka-leader-election --election-type preferred` does; left alone, the brokers'
    auto.leader.rebalance would do it within 5 minutes); returns how long that took."""
    t0 = time.monotonic()
    last: list[str] = []

    def in_sync() -> bool:
        nonlocal last
        try:
            last = out_of_sync()
            if not last:
                off = _off_preferred_leader()
                if off:
                    last = [f"{len(off)} partitions off their preferred leader"]
                    adm = _admin()  # keep a reference: a destroyed handle fails its futures
                    # No request_timeout: confluent-kafka 2.16's elect_leaders raises SystemError on
                    # its own timeout keywords; result(timeout) bounds the wait instead.
                    adm.elect_leaders(ElectionType.PREFERRED, off).result(timeout=15)
        except Exception as e:  # a node still starting may refuse the metadata request
            last = [f"{type(e).__name__}: {e}"]
        return not last

    try:
        testkit.wait_for(in_sync, timeout, interval=0.5, what="the cluster in sync")
    except TimeoutError:
        raise AssertionError(f"cluster not in sync after {timeout:.0f}s: {last[:5]}") from None
    return time.monotonic() - t0


def wait_new_controller(old: int, timeout: float = 30) -> int:
    """Until the quorum has a leader other than `old`; returns it."""
    def elected() -> int | None:
        try:
            leader = cluster.active_controller()
        except Exception:
            return None
        return leader if leader not in (old, -1) else None

    found: int = testkit.wait_for(elected, timeout, interval=0.2, what=f"a controller other than node {old}")
    return found


@contextlib.contextmanager
def proxies() -> Iterator[dict[int, TcpProxy]]:
    """A TCP proxy in front of each node's PROXIED listener, on the port it advertises: a client
    bootstrapped at cluster.proxied_bootstrap() talks to the cluster through them only."""
    made: dict[int, TcpProxy] = {}
    try:
        for i in cluster.NODES:
            n = cluster.node(i)
            made[i] = TcpProxy(cluster.HOST, n.proxied_port, listen_port=n.proxy_port).start()
        yield made
    finally:
        for p in made.values():
            p.close()


def summary_roles(r: Roles) -> dict[str, Any]:
    return {"group_coordinator": r.group_coordinator, "txn_coordinator": r.transaction_coordinator,
            "controller": r.controller}


# ---------------------------------------------------------------------------- a scenario's run

# Valid records, exact replays (duplicates the table absorbs) and poison records (the DLQ).
def _mixed(sc: Scenario) -> Planned:
    return sc.factory.mixed(invalid=0.05, replay=0.03)


@dataclass
class ClusterRun:
    """One sink under a steady stream on the cluster, with a stable transactional id (as a pod
    name would give) whose coordinator is not the group's: a fault hits one coordinator at a time."""

    sc: Scenario
    transactional_id: str
    env: dict[str, Any]
    sink: testkit.SinkProcess
    group_coordinator_killed: bool = False

    @classmethod
    def begin(cls, sc: Scenario, rate: float = 300, **env: Any) -> ClusterRun:
        tid = transactional_id_apart(sc.group, {group_coordinator(sc.group)})
        env = {"kafka_transactional_id": tid, **env}
        run = cls(sc, tid, env, sc.sink(**env))
        sc.producer.stream(lambda: _mixed(sc), None, rate=rate)
        run.supervise(sc.wait_progress, 120)
        return run

    def roles(self) -> Roles:
        return roles(self.sc.topic, self.sc.group, self.transactional_id)

    def kill(self, node_id: int, now: Roles) -> None:
        """SIGKILL a node, noting whether it coordinated the sink's group."""
        cluster.stop_node(node_id, kill=True)
        self.group_coordinator_killed |= node_id == now.group_coordinator

    def assert_no_sink_restart(self) -> None:
        """The sink rode out the faults without its watchdog.  Not asserted once a SIGKILLed node
        was the group coordinator: librdkafka's send_offsets_to_transaction() can then hang past
        its timeout (librdkafka#5456, see docs/chaos.md) and the watchdog's restart is the fix."""
        if self.group_coordinator_killed:
            self.sc.note("a group coordinator was SIGKILLed: watchdog restarts are allowed")
            return
        assert self.sc.extra["sink_restarts"] == 0, f"the sink's watchdog ended it ({self.sc.extra})"

    def restart(self) -> testkit.SinkProcess:
        return self.sc.sink(**self.env)

    def bring_back(self, node_id: int, fault: Fault, down: float) -> None:
        """Start the killed node `down` seconds after the fault, wait until the cluster is in
        sync, and until the sink works again."""
        time.sleep(max(0.0, fault.started + down - time.monotonic()))
        with self.sc.fault("restart", f"node {node_id}"):
            cluster.start_node(node_id)
            wait_in_sync()
        self.supervise(self.sc.wait_progress)

    def supervise(self, wait: Callable[[float], object], seconds: float = 150) -> None:
        """Wait, restarting a sink its watchdog ended (counted as sink_restarts).  150 s: the
        watchdog's 90 s deadline, a restart, and a rejoin."""
        self.sink = self.sc.supervise(self.sink, wait, time.monotonic() + seconds, self.restart)

    def committed_everywhere_since(self, fault: Fault, seconds: float = 150) -> None:
        """Wait until every partition committed again after the fault was injected."""
        self.supervise(functools.partial(self.sc.wait_all_committed_after, fault.started), seconds)

    def end(self) -> None:
        """Stop the stream, let the sink commit everything, record the per-fault commit stalls and
        the nodes' memory, check the invariants, and stop the sink cleanly."""
        sc = self.sc
        sc.producer.stop_stream()
        self.supervise(sc.wait_caught_up, 240)
        stalls = []
        for i, f in enumerate(sc.faults):
            until = sc.faults[i + 1].started if i + 1 < len(sc.faults) else time.monotonic()
            where = " ".join(f.detail.split()[:2])  # "node <id>": details start with Roles.of
            stalls.append(f"{f.kind} {where} {_longest_gap(sc, f.started, until):.1f}s")
        # Per fault: the longest time without any commit, from the fault to the next one.
        sc.extra["commit_stall"] = "[" + ", ".join(stalls) + "]"
        sc.extra.setdefault("sink_restarts", 0)
        sc.extra["cluster_rss_mib"] = sum(cluster.rss_kib().values()) // 1024
        sc.assert_invariants()
        sc.wait_assigned(self.sink)
        assert self.sink.stop() == 0


def _longest_gap(sc: Scenario, start: float, until: float) -> float:
    """The longest time between growths of the committed offsets from `start` to `until` (or to
    the first growth after `start`, if none came before `until`)."""
    times = [t for t, _ in sc.checker.stats.progress if t > start]
    points = [start, *([t for t in times if t <= until] or times[:1])]
    return max((b - a for a, b in itertools.pairwise(points)), default=0.0)
