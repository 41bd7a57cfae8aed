"""kafka-timescale-sink: Kafka -> validated batches -> PostgreSQL/TimescaleDB, DLQ on the side."""

__version__ = "0.1.0"
