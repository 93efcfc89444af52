"""Optuna storage opened by several processes at once on fresh PostgreSQL databases (the shared-study case).

Machines that join one sensitivity study start ``transferbench sensitivity`` against the same
PostgreSQL URL; on a database with no schema yet they race Optuna's schema creation
(``relation "alembic_version" already exists``, duplicate keys). ``open_storage`` reopens.
"""

from __future__ import annotations

import pytest

from tuning.test_storage import ROUNDS, open_at_once

pytestmark = pytest.mark.slow


def test_processes_opening_a_fresh_postgres_storage_at_once_all_succeed(postgres) -> None:
    open_at_once([postgres.create_database(f"optuna_race_{i}") for i in range(ROUNDS)])
