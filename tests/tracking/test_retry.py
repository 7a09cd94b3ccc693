"""The create-race retry on real database errors: a duplicate MLflow dataset row, as a
worker gets it when another one logged the same dataset first (SQLite and PostgreSQL)."""

from __future__ import annotations

import logging
import uuid

import pytest
from mlflow.entities import Dataset, DatasetInput
from mlflow.store.tracking.dbmodels.models import SqlDataset
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

from skinml.core.errors import SkinmlError
from skinml.tracking.retry import is_create_race, retry_create_race


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> SqlAlchemyStore:
    uri = (f"sqlite:///{tmp_path / 'mlflow.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres")[1])
    return SqlAlchemyStore(uri, str(tmp_path / "artifacts"))


def lost_race(store: SqlAlchemyStore) -> Exception:
    """The error of inserting a dataset row another worker has just inserted."""
    experiment_id = store.create_experiment(f"race-{uuid.uuid4().hex[:6]}")
    run = store.create_run(experiment_id, "u", 0, [], "r")
    dataset = Dataset(name="ham10000-train", digest="3eda5006", source_type="local",
                      source='{"uri": "/data"}')
    store.log_inputs(run.info.run_id, [DatasetInput(dataset=dataset)])
    try:
        with store.ManagedSessionMaker(read_only=False) as session:
            session.add(SqlDataset(dataset_uuid=uuid.uuid4().hex, experiment_id=int(experiment_id),
                                   name=dataset.name, digest=dataset.digest,
                                   dataset_source_type="local", dataset_source="{}"))
    except Exception as exc:
        return exc
    raise AssertionError("the duplicate row was accepted")


def test_a_lost_insert_race_is_retried_and_then_succeeds(store, caplog):
    exc = lost_race(store)
    assert is_create_race(exc), exc
    calls = []

    def log_input() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return "logged"

    with caplog.at_level(logging.INFO, logger="skinml.tracking.retry"):
        assert retry_create_race(log_input, "dataset ham10000-train (3eda5006)") == "logged"
    assert len(calls) == 2
    assert "dataset ham10000-train (3eda5006) is being created by another worker; retrying" \
        in caplog.messages


def test_a_race_that_never_ends_is_one_error_and_other_errors_pass(store):
    exc = lost_race(store)

    def always() -> None:
        raise exc

    with pytest.raises(SkinmlError, match=r"^cannot create the tables of X: other workers "
                                          r"kept racing$"):
        retry_create_race(always, "the tables of X", attempts=2)

    def broken() -> None:
        raise ValueError("disk full")

    with pytest.raises(ValueError, match="disk full"):
        retry_create_race(broken, "anything")


def test_every_race_text_retry_matches_is_what_the_installed_libraries_say(store):
    """retry.py tells a lost create race by its text (SQLAlchemy wraps each driver's error
    differently): each text it matches, produced here for real (or read from alembic), so an
    upgrade that rewords one fails here rather than in a race."""
    import inspect

    import alembic.runtime.migration
    import sqlalchemy

    assert is_create_race(lost_race(store))  # a duplicate row: the unique constraint
    with store.engine.connect() as connection:  # two workers creating the same table
        connection.execute(sqlalchemy.text("CREATE TABLE raced (id INTEGER)"))
        connection.commit()
        with pytest.raises(sqlalchemy.exc.DatabaseError) as second:
            connection.execute(sqlalchemy.text("CREATE TABLE raced (id INTEGER)"))
    assert is_create_race(second.value), second.value
    # alembic, when another process migrated the fresh database meanwhile
    assert "Online migration expected to match one" in inspect.getsource(
        alembic.runtime.migration)
