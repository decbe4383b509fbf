"""Versions of the state database's schema, and the steps from each to the next.

Version 1 is the schema as first released (made with ``create_all``, no version stored: such a
database is read as version 1). Every later change to the tables adds one step here; a service
brings its database up to :data:`LATEST` at start, under its lease (one writer), before it
reads anything, and refuses a database a newer release has already moved past, rather than
misread it.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.engine import Connection

#: The meta-table key holding the schema's version.
VERSION_KEY = "schema_version"

def _outcome_columns(conn: Connection) -> None:
    """2: how a cluster ended is a reason from a fixed list plus a detail. Version 1 kept one
    string (``failed: scheduler exited ...``); the reason and detail are split out of it."""
    conn.exec_driver_sql("ALTER TABLE clusters ADD COLUMN stop_detail TEXT")
    known = {"user", "idle", "no-client", "service-shutdown", "failed"}
    rows = conn.exec_driver_sql(
        "SELECT id, stop_reason FROM clusters WHERE stop_reason IS NOT NULL").all()
    for cluster_id, stored in rows:
        reason, _, detail = str(stored).partition(": ")
        if reason not in known or (reason != "failed" and detail):
            reason, detail = "failed", str(stored)
        conn.execute(text("UPDATE clusters SET stop_reason = :reason, stop_detail = :detail "
                          "WHERE id = :id"),
                     {"reason": reason, "detail": detail or None, "id": cluster_id})


def _wanted_column(conn: Connection) -> None:
    """3: what is wanted of a cluster is a state (running, stopped; room for more), no longer
    a stop flag beside what it is."""
    conn.exec_driver_sql(
        "ALTER TABLE clusters ADD COLUMN wanted VARCHAR(16) NOT NULL DEFAULT 'running'")
    # Stopped by a user, a reap or a shutdown (which did not always set the flag).
    conn.exec_driver_sql(
        "UPDATE clusters SET wanted = 'stopped' WHERE stop_requested OR status = 'stopped'")
    conn.exec_driver_sql("ALTER TABLE clusters DROP COLUMN stop_requested")


def _environment_column(conn: Connection) -> None:
    """4: a cluster may run in a named Python environment."""
    conn.exec_driver_sql("ALTER TABLE clusters ADD COLUMN environment VARCHAR(64)")


#: ``STEPS[i]`` takes a database from version ``i + 1`` to ``i + 2``, inside one transaction.
STEPS: list[Callable[[Connection], None]] = [_outcome_columns, _wanted_column,
                                             _environment_column]

LATEST = 1 + len(STEPS)


def pending(version: int) -> list[Callable[[Connection], None]]:
    """The steps a database at ``version`` still needs."""
    return STEPS[version - 1:]
