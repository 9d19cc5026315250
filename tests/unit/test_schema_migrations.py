"""The Alembic migrations build exactly the schema that the models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import fleet.models  # noqa: F401 - registers the tables in SQLModel.metadata
from fleet.db import make_engine, migrate


def test_migrated_database_matches_the_models(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrate(engine)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert differences == [], "a model change without its migration, or the reverse"
