"""Refused logins and TLS failures, which librdkafka reports only to error_cb and retries like a
lost connection, turned into the fatal errors they are; the principal's name for ACL hints."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from sink.errors import classify_kafka_error
from sink.settings import Settings

# What no retry fixes: wrong credentials or mechanism, a certificate the CA does not vouch for.
_REFUSALS = frozenset({KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._SSL})


class LoginWatch:
    """An error_cb that keeps the first refused login or TLS failure a client reports."""

    def __init__(self) -> None:
        self.refused: Any = None

    def __call__(self, err: Any) -> None:
        if self.refused is None and err.code() in _REFUSALS:
            self.refused = err

    def check(self, client: Any, cause: str) -> None:
        """After a failed call: serve the client's error_cb, and raise the FatalError for a refusal
        it reported (its text never holds the password)."""
        with contextlib.suppress(KafkaException):  # a producer in a fatal state raises that error here
            client.poll(0)
        if self.refused is not None:
            raise classify_kafka_error(self.refused, cause)


def principal(settings: Settings) -> str:
    """The principal the brokers see the sink as, where the settings say (SASL)."""
    conf = settings.kafka_client_config()
    return f"User:{conf['sasl.username']}" if conf.get("sasl.username") else ""


def admin_metadata(settings: Settings, cause: str, timeout: float = 15.0) -> tuple[Any, Any]:
    """An admin client and the cluster's metadata (the topics the principal may describe).  A
    refused login or TLS setup is a FatalError within about a second, not a retryable timeout."""
    watch = LoginWatch()
    conf: dict[str, Any] = {**settings.kafka_client_config(), "error_cb": watch}
    admin = AdminClient(conf)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return admin, admin.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
        except KafkaException as e:
            watch.check(admin, cause)
            if time.monotonic() >= deadline:
                raise classify_kafka_error(e, cause) from e
