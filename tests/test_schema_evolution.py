"""docs/schema.md's procedure for adding a nullable column, done for real: a new migration, a
field at the end of the model, and the insert following the model's fields."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import pytest
from psycopg import sql
from pydantic import Field, StringConstraints

from dev import testkit
from sink.migrations import migrate
from sink.model import COLUMNS, PRIMARY_KEY, IotMeasurement, as_row
from sink.settings import Settings
from sink.writer import PgWriter, insert_statement

pytestmark = [pytest.mark.integration, pytest.mark.both_servers]

REPO_SQL = Path(__file__).resolve().parent.parent / "sql"


class WithFirmware(IotMeasurement):
    """Step 2 of the procedure: the new field at the end, optional, default None."""

    firmware: Annotated[str, StringConstraints(max_length=32)] | None = Field(None, alias="fw")


def settings(schema: str) -> Settings:
    return testkit.db_settings(schema)


def test_insert_statement_follows_the_models_fields() -> None:
    cols = tuple(WithFirmware.model_fields)
    assert cols == (*COLUMNS, "firmware")
    text = repr(insert_statement(sql.Identifier("s", "iot_measurements"), cols, PRIMARY_KEY))
    assert "'firmware'" in text and "ON CONFLICT DO NOTHING" in text


def test_adding_a_nullable_column_keeps_old_and_new_writers_working(schema: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    st = settings(schema)
    migrate(st)
    old = PgWriter(st.conninfo(), schema)
    old_row = as_row(IotMeasurement.model_validate({"timestamp": 1_700_000_000, "mac_address": "old"}))
    assert old.write([old_row]).inserted == 1

    # Step 1: a new migration file next to the existing ones.
    sql = tmp_path / "sql"
    shutil.copytree(REPO_SQL, sql)
    (sql / "900_firmware.sql").write_text(
        "ALTER TABLE iot_measurements ADD COLUMN IF NOT EXISTS firmware VARCHAR(32);\n")
    monkeypatch.setenv("SINK_SQL_DIR", str(sql))
    report = migrate(st)
    assert report.applied == ("900_firmware.sql",)

    new = PgWriter(st.conninfo(), schema, columns=tuple(WithFirmware.model_fields))
    m = WithFirmware.model_validate({"timestamp": 1_700_000_001, "mac_address": "new", "fw": "1.2.3"})
    assert new.write([tuple(getattr(m, c) for c in WithFirmware.model_fields)]).inserted == 1
    # A replica still on the old model keeps writing: the new column stays NULL for its rows.
    old.close()
    old_row2 = as_row(IotMeasurement.model_validate({"timestamp": 1_700_000_002, "mac_address": "old"}))
    assert PgWriter(st.conninfo(), schema).write([old_row2]).inserted == 1


    with testkit.connect(schema) as conn:
        got = conn.execute("SELECT device_id, firmware FROM iot_measurements ORDER BY timestamp").fetchall()
    assert got == [("old", None), ("new", "1.2.3"), ("old", None)]
    new.close()


def test_writer_refuses_a_model_field_the_table_lacks(schema: str) -> None:
    from sink.errors import FatalError

    st = settings(schema)
    migrate(st)
    with pytest.raises(FatalError, match="lacks column"):
        PgWriter(st.conninfo(), schema, columns=tuple(WithFirmware.model_fields)).connect()
