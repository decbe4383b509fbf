"""When to reap: a pure decision from a cluster's record and its latest report."""

from __future__ import annotations

from provisioner.models import ClusterRecord, StopReason
from provisioner.watch import Report


def reap_reason(record: ClusterRecord, report: Report | None, age: float) -> StopReason | None:
    """Why to stop this cluster now, or None.

    ``age`` is how long ago the report was taken; the report's durations grow by that much.
    A cluster with any task processing, queued or unrunnable, or a graph being submitted,
    is never reaped.
    """
    if report is None or report.busy:
        return None
    no_client_for = report.no_client_for
    if no_client_for is not None and no_client_for + age >= record.no_client_timeout:
        return StopReason.NO_CLIENT
    idle_for = report.idle_for
    if idle_for is not None and idle_for + age >= record.idle_timeout:
        return StopReason.IDLE
    return None
