-- requires: timescaledb
-- Hypertable on "timestamp" and its compression settings.  Applied only where the timescaledb
-- extension is available (TimescaleDB >= 2.18.1, see docs/schema.md); skipped, and not
-- recorded, elsewhere, so it runs on the first start after the extension appears.
--
-- :'chunk_interval' is a psql-style variable: the runner substitutes TIMESCALE_CHUNK_INTERVAL
-- as a quoted literal (psql -v chunk_interval='1 day' -f this_file does the same).  The
-- compression, retention and refresh policies are not set here: the sink reconciles them with
-- the TIMESCALE_* settings at every start (sink/migrations.py).

-- In "public": the extension's functions must stay reachable from every sink schema (the
-- connection's search_path is "<TIMESCALE_SCHEMA>, public"), and the extension cannot be moved
-- later (no ALTER EXTENSION ... SET SCHEMA).  A no-op where the image already created it.
CREATE EXTENSION IF NOT EXISTS timescaledb WITH SCHEMA public;

-- by_range() is the dimension builder of TimescaleDB 2.13+.  migrate_data: rows written while
-- the database ran without the extension move into chunks.  No default index: the primary key
-- already starts with "timestamp".  if_not_exists: a hypertable made by the old
-- timescale_init.sql is kept (its chunk interval is then reconciled by the sink).
SELECT create_hypertable(
    'iot_measurements',
    by_range('timestamp', :'chunk_interval'::interval),
    create_default_indexes => false,
    if_not_exists => true,
    migrate_data => true
);

-- Segment by device and component (queries filter on them), newest first inside a segment.
-- connector_mode and pin_position close the primary key in the order-by list: the unique
-- check on INSERT into a compressed chunk can then narrow the batches it decompresses by
-- their min/max metadata (TimescaleDB otherwise warns "should be used for segmenting or
-- ordering").  timescaledb.compress* is the compression API; 2.18 also names it columnstore
-- (enable_columnstore/segmentby/orderby) and documents both as supported.
-- A deployment whose chunks are already compressed keeps its settings: older TimescaleDB
-- versions refuse to change them then, and re-compressing old chunks is an operator's call.
DO $$
BEGIN
    IF EXISTS (
        SELECT 1
        FROM timescaledb_information.chunks
        WHERE hypertable_schema = current_schema()
          AND hypertable_name = 'iot_measurements'
          AND is_compressed
    ) THEN
        RAISE NOTICE 'iot_measurements has compressed chunks: compression settings left unchanged';
    ELSE
        ALTER TABLE iot_measurements SET (
            timescaledb.compress,
            timescaledb.compress_segmentby = 'device_id, component_type',
            timescaledb.compress_orderby = 'timestamp DESC, connector_mode, pin_position'
        );
    END IF;
END
$$;
