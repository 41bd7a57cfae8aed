"""dev/cluster.py and dev/kafka_wire.py without a cluster: the port layout, the quorum's lag,
the wire encoding, and the roles the cluster scenarios pick their victims by."""

from __future__ import annotations

from chaos_tests.cluster_faults import Roles
from dev import cluster, kafka_wire


def test_each_node_has_four_distinct_ports_within_forty_of_the_base() -> None:
    nodes = [cluster.Node(i, 59100) for i in cluster.NODES]
    ports = [p for n in nodes for p in (n.port, n.controller_port, n.proxied_port, n.proxy_port)]
    assert len(set(ports)) == 12 and min(ports) == 59101 and max(ports) == 59133


def test_quorum_lag_is_distance_to_the_high_watermark_and_unknown_is_minus_one() -> None:
    q = kafka_wire.Quorum(leader_id=2, leader_epoch=5, high_watermark=100, voters={1: 100, 2: 100, 3: 90, 4: -1})
    assert q.lag() == {1: 0, 2: 0, 3: 10, 4: -1}


def test_unsigned_varints_and_compact_strings_round_trip() -> None:
    for n in (0, 1, 127, 128, 300, 2**21 + 5):
        assert kafka_wire._Reader(kafka_wire._uvarint(n)).uvarint() == n
    assert kafka_wire._Reader(kafka_wire._compact_str("__cluster_metadata")).compact_str() == "__cluster_metadata"
    assert kafka_wire._Reader(b"\x00").compact_str() is None


def test_busiest_leader_breaks_ties_by_the_lowest_id_and_roles_read_as_words() -> None:
    r = Roles(leaders={0: 3, 1: 2, 2: 3, 3: 2}, group_coordinator=2, transaction_coordinator=1, controller=3)
    assert r.busiest_leader() == 2
    assert r.of(3) == "node 3 (leader of [0, 2], active controller)"
    assert r.of(1) == "node 1 (leader of [], transaction coordinator)"
