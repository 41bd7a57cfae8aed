# kafka-timescale-sink: the service image.  See docs/container.md.
#
#   docker build -t kafka-timescale-sink .
#   docker run --rm -e KAFKA_BOOTSTRAP_SERVERS=... -e TIMESCALE_HOST=... kafka-timescale-sink
#
# No configuration or secret is baked in: every setting comes from the environment at run time.

# --- build: install the project and its pinned dependency ranges (pyproject.toml) into a venv
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sink/ sink/
COPY dlq/ dlq/
# A regular (non-editable) install: the runtime stage needs the venv only, not /src.
RUN pip install .

# --- runtime
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SINK_SQL_DIR=/app/sql \
    METRICS_PORT=9108

# A fixed numeric uid/gid so orchestrators can enforce runAsNonRoot.
RUN groupadd --system --gid 10001 sink \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin sink

COPY --from=build /opt/venv /opt/venv
# The numbered migrations, read at start (RUN_MIGRATIONS=true) or by `kafka-timescale-sink migrate`.
COPY sql/ /app/sql/

WORKDIR /app
USER 10001:10001

# /metrics, /healthz and /readyz.
EXPOSE 9108

# python:3.11-slim has no curl; urllib exits non-zero on a refused connection or an HTTP error.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('METRICS_PORT', '9108') + '/healthz', timeout=4)"]

# Exec form: the service is PID 1 and receives SIGTERM itself, so it finishes the current
# batch and commits before it exits (give it SHUTDOWN_TIMEOUT plus a margin to stop).
ENTRYPOINT ["kafka-timescale-sink"]
CMD ["run"]
