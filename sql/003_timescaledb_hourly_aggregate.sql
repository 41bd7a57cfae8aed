-- requires: timescaledb
-- Hourly rollup per device and component.  Its refresh policy is reconciled by the sink at
-- every start (TIMESCALE_CAGG_REFRESH_INTERVAL); it has no retention policy, so the hourly
-- history outlives the raw rows dropped by TIMESCALE_RETENTION.
--
-- WITH NO DATA: the runner applies each migration in a transaction, and a continuous
-- aggregate created WITH DATA (the default) cannot be created inside a transaction block.
-- For rows that existed before this migration, run once, outside a transaction:
--   CALL refresh_continuous_aggregate('iot_measurements_hourly', NULL, now() - INTERVAL '1 hour');
-- materialized_only = false: queries also aggregate the newest rows the policy has not
-- materialized yet (real-time aggregation).
CREATE MATERIALIZED VIEW IF NOT EXISTS iot_measurements_hourly
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT
    time_bucket(INTERVAL '1 hour', "timestamp") AS bucket,
    device_id,
    component_type,
    count(*) AS measurements,
    count(value) AS value_count,
    avg(value) AS avg_value,
    min(value) AS min_value,
    max(value) AS max_value
FROM iot_measurements
GROUP BY bucket, device_id, component_type
WITH NO DATA;
