"""Optuna's study storage for the sensitivity studies: where it is, and opening it safely.

``sensitivity.storage`` (``$OPTUNA_STORAGE`` overrides) is any SQLAlchemy URL: the default
embedded SQLite file, or a shared database (PostgreSQL) that workers on several machines join.
Opened with heartbeats (``heartbeat_interval``, ``grace_period``) and ``RetryUnclaimed``, and
safe to open from several processes at once on a database that has no schema yet.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from transferbench.config import SensitivitySettings

log = logging.getLogger(__name__)
STORAGE_ENV = "OPTUNA_STORAGE"


def resolve_storage_url(configured: str) -> str:
    """$OPTUNA_STORAGE, else params; a relative SQLite path is made absolute and its folder created."""
    url = os.environ.get(STORAGE_ENV) or configured
    prefix = "sqlite:///"
    if url.startswith(prefix):
        path = Path(url[len(prefix):])
        path = path if path.is_absolute() else path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = prefix + str(path)
    return url


def redact(url: str) -> str:
    """The URL without its password (for JSON and MLflow)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class RetryUnclaimed(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a failed trial, minus the dead worker's stamp (``worker``, ``ray_node``).

    The copy is then unclaimed until a worker runs it, so no process mistakes the worker that
    picked it up for the dead one (``reclaim_dead_trials``).
    """

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("worker", "ray_node")}
        super().__call__(study, trial)


# Attempts at opening a storage whose schema another process is creating at the same moment.
SCHEMA_RACE_ATTEMPTS = 5


def open_storage(url: str, sensitivity: SensitivitySettings) -> optuna.storages.RDBStorage:
    """Optuna's RDBStorage on ``url``, safe to open from several processes on a fresh database.

    Optuna creates its tables and alembic/version rows on first open with check-then-create
    steps, so processes opening a new database at the same moment race one another ("table
    studies already exists", a duplicate ``alembic_version`` key; optuna#1092, #4621). The loser
    opens again: by then the schema exists and the checks pass.
    """
    import sqlalchemy.exc

    # SQLite serialises writers: several workers wait for the lock instead of failing at once.
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(1, SCHEMA_RACE_ATTEMPTS + 1):
        try:
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=sensitivity.heartbeat_interval,
                grace_period=sensitivity.grace_period,
                heartbeat_stale_trial_callback=RetryUnclaimed(max_retry=2))
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError,
                sqlalchemy.exc.ProgrammingError) as err:
            lost_race = isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)
            if not lost_race or attempt == SCHEMA_RACE_ATTEMPTS:
                raise
            log.warning("Optuna storage %s: another process was creating its schema (%s); opening again",
                        redact(url), type(err.orig).__name__)
            time.sleep(0.2 * attempt)
    if url.startswith("sqlite"):
        _serialise_sqlite_transactions(storage.engine)
    return storage


def _serialise_sqlite_transactions(engine: Any) -> None:
    """Every transaction on this SQLite engine starts with ``BEGIN IMMEDIATE`` (SQLAlchemy's recipe).

    Optuna claims a WAITING trial with read-then-update under ``SELECT ... FOR UPDATE``, a row
    lock PostgreSQL honours and SQLite ignores; and Python's sqlite3 runs that SELECT outside any
    transaction. Two workers could then both read WAITING and both run the same trial (seen in
    CI: "Cannot tell a COMPLETE trial"). With the write lock taken at BEGIN, they queue instead.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's BEGIN below, not sqlite3's own

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while the schema was set up predate the listeners
