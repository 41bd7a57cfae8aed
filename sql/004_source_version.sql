-- WRITE_MODE=update with WRITE_VERSION=kafka_timestamp: each row's version, the Kafka timestamp
-- (milliseconds) of the record that wrote it.  An update goes through only when the incoming
-- version is not older, so re-applying an older record never overwrites a newer correction.
-- NULL for rows written in ignore mode (and before this column existed): any update wins.
-- Nullable, without a default: adding it changes only the catalog, not a stored row.
ALTER TABLE iot_measurements ADD COLUMN IF NOT EXISTS source_version BIGINT;
