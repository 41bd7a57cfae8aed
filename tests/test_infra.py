"""The local infrastructure itself: a real broker that survives SIGKILL, a real PostgreSQL."""

from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition

from dev import services, testkit


def test_postgres_accepts_the_service_role(infra: None) -> None:
    with testkit.connect() as conn:
        row = conn.execute("SELECT current_user, current_database()").fetchone()
    assert row == (services.PG_USER, services.PG_DB)


def test_start_is_idempotent_and_fast_when_running(infra: None) -> None:
    import time

    t0 = time.monotonic()
    services.start_kafka()
    services.start_postgres()
    assert time.monotonic() - t0 < 5


def test_broker_killed_and_restarted_keeps_topics_and_committed_offsets(infra: None) -> None:
    topic = testkit.create_topic(testkit.unique_name("t"), partitions=2)
    try:
        sent = testkit.produce(topic, [{"n": i} for i in range(10)], partition=0)
        group = testkit.unique_name("g")
        c = Consumer({"bootstrap.servers": services.KAFKA_BOOTSTRAP, "group.id": group,
                      "enable.auto.commit": False})
        c.commit(offsets=[TopicPartition(topic, 0, 7)], asynchronous=False)
        c.close()

        try:
            services.stop_kafka(kill=True)
            assert not services.kafka_running()
        finally:
            services.start_kafka()

        assert testkit.committed_offsets(group, topic) == {0: 7}
        assert testkit.end_offsets(topic) == {0: 10, 1: 0}
        assert [r.value for r in testkit.read_all(topic)] == [s.value for s in sent]
    finally:
        testkit.delete_topics([topic])
