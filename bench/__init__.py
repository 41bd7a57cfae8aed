"""End-to-end benchmark of the sink against the local real Kafka and PostgreSQL (issue 8).

Run it with ``.venv/bin/python -m bench.run --help``; docs/performance.md explains the numbers.
"""
