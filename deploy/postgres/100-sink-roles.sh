#!/usr/bin/env bash
# The TimescaleDB image runs this once, on an empty data directory (/docker-entrypoint-initdb.d),
# as POSTGRES_USER in POSTGRES_DB: it creates the sink's owner and runtime roles and the schema
# (sink-roles.sql).  On an existing volume, run it by hand:
#   docker compose exec timescaledb bash /docker-entrypoint-initdb.d/100-sink-roles.sh
set -eo pipefail  # no -u: the image sources scripts without the executable bit
: "${TIMESCALE_OWNER_PASSWORD:?set TIMESCALE_OWNER_PASSWORD for the timescaledb service}"
: "${TIMESCALE_WRITER_PASSWORD:?set TIMESCALE_WRITER_PASSWORD for the timescaledb service}"
psql --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set owner_role=sink_owner --set owner_password="$TIMESCALE_OWNER_PASSWORD" \
  --set writer_role=sink_writer --set writer_password="$TIMESCALE_WRITER_PASSWORD" \
  --set schema=iot \
  --file /opt/sink/sink-roles.sql
