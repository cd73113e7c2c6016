"""Store fixtures. Every store test runs on SQLite and on PostgreSQL (a fresh schema per
test); the PostgreSQL run skips when OPENLORA_TEST_PG_URL is unset (.ci/postgres.sh sets it)."""
from __future__ import annotations

import os

import pytest

from tests.helpers import fresh_pg_schema
from tests.store.harness import StoreHarness

PG_ENV = "OPENLORA_TEST_PG_URL"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"PostgreSQL not available: {PG_ENV} is unset (`source .ci/postgres.sh` starts one)")
    # every connection of the store under test lives in a fresh schema
    with fresh_pg_schema(base, "t") as url:
        yield url


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def store(data_dir, db_url):
    harness = StoreHarness(data_dir, db_url).start()
    yield harness
    harness.stop()
