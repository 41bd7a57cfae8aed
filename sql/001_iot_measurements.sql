-- The spec's table, primary key and indexes: plain PostgreSQL, with or without TimescaleDB.
-- IF NOT EXISTS: deployments created by the old sql/timescale_init.sql already have them.
-- The columns follow sink/model.py (IotMeasurement); the writer inserts model fields only.

CREATE TABLE IF NOT EXISTS iot_measurements (
    timestamp TIMESTAMPTZ NOT NULL,
    device_id VARCHAR(50) NOT NULL,
    connector_mode VARCHAR(50) NOT NULL,
    component_type VARCHAR(50) NOT NULL,
    pin_position VARCHAR(10),
    value DOUBLE PRECISION,
    unit VARCHAR(20),
    topic VARCHAR(255),
    -- Starts with the time column: TimescaleDB requires the partitioning column in every
    -- unique constraint, and ON CONFLICT DO NOTHING makes redelivered records no-ops.
    PRIMARY KEY (timestamp, device_id, connector_mode, component_type, pin_position)
);

CREATE INDEX IF NOT EXISTS idx_iot_device_id ON iot_measurements (device_id, timestamp DESC);
CREATE INDEX IF NOT EXISTS idx_iot_component ON iot_measurements (component_type, timestamp DESC);
CREATE INDEX IF NOT EXISTS idx_iot_mode ON iot_measurements (connector_mode, timestamp DESC);
