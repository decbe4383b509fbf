"""Versions of the state database's schema, and the steps from each to the next.

Version 1 is the schema as first released (made with ``create_all``, no version stored: such a
database is read as version 1). Every later change to the tables adds one step here; a service
brings its database up to :data:`LATEST` at start, under its lease (one writer), before it
reads anything, and refuses a database a newer release has already moved past, rather than
misread it.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.engine import Connection

#: The meta-table key holding the schema's version.
VERSION_KEY = "schema_version"

#: ``STEPS[i]`` takes a database from version ``i + 1`` to ``i + 2``, inside one transaction.
STEPS: list[Callable[[Connection], None]] = []

LATEST = 1 + len(STEPS)


def pending(version: int) -> list[Callable[[Connection], None]]:
    """The steps a database at ``version`` still needs."""
    return STEPS[version - 1:]
