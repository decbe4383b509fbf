"""Slurm jobs as the backend sees them: one job's facts read from ``squeue --json``, the states
a job passes through, the marker that says a job is ours, and how a job's end reads as a
scheduler's outcome or a worker's loss.

``squeue --json`` lists every user's jobs, and a tenant can submit jobs of its own with any
name and comment: every field is checked for type and size before use, and a job is only
ever matched by the id the service recorded when it submitted it (the marker serves only to
find jobs of ours that no record accounts for, to cancel them).
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass
from typing import Any

from clusters.base import REAP_REASONS, Outcome


class JobState(enum.StrEnum):
    """Slurm's base job states (``job_state`` of ``squeue --json``); OTHER: one this code does
    not know (a later Slurm's), read as no end of the job."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    OTHER = "OTHER"

    @classmethod
    def of(cls, text: object) -> JobState:
        try:
            return cls(str(text))
        except ValueError:
            return cls.OTHER

    @property
    def ended(self) -> bool:
        return self in ENDED


ENDED = frozenset({
    JobState.COMPLETED, JobState.CANCELLED, JobState.FAILED, JobState.TIMEOUT,
    JobState.NODE_FAIL, JobState.PREEMPTED, JobState.BOOT_FAIL, JobState.DEADLINE,
    JobState.OUT_OF_MEMORY,
})

#: Job comments of ours: ``dask-provisioner <service marker> <cluster id> <process>``.
MARKER_PREFIX = "dask-provisioner"
_MARKER = re.compile(r"dask-provisioner ([0-9a-f]{16}) ([A-Za-z0-9-]{1,64}) (\S{1,80})")
_TEXT_LIMIT = 200


def marker(service: str, cluster_id: str, process: str) -> str:
    return f"{MARKER_PREFIX} {service} {cluster_id} {process}"


def _text(value: object) -> str:
    """A bounded one-line string from a field (anything else: empty)."""
    if not isinstance(value, str):
        return ""
    return value[:_TEXT_LIMIT].replace("\n", " ").replace("\r", " ")


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class Job:
    """One job as ``squeue --json`` shows it (the fields the backend uses, checked)."""

    job_id: int
    state: JobState
    reason: str  # Slurm's state reason: why it pends, or how it ended ("None" when neither)
    node: str  # the node running its batch script; "" while pending
    exit_status: int | None  # the batch script's exit status, when it exited
    signal: int | None  # the signal that ended it, when one did
    comment: str
    user: str
    account: str

    @classmethod
    def parse(cls, raw: Any) -> Job | None:
        """A job from one entry of ``jobs``; None for an entry without a usable id."""
        if not isinstance(raw, dict):
            return None
        job_id = _int(raw.get("job_id"))
        if job_id is None or job_id <= 0:
            return None
        exit_status, signal = _exit(raw.get("exit_code"))
        state = raw.get("job_state")
        if isinstance(state, list):  # Slurm 23.02 on: a list, the base state first
            state = state[0] if state else None
        return cls(job_id=job_id, state=JobState.of(state),
                   reason=_text(raw.get("state_reason")), node=_text(raw.get("batch_host")),
                   exit_status=exit_status, signal=signal or None,
                   comment=_text(raw.get("comment")), user=_text(raw.get("user_name")),
                   account=_text(raw.get("account")))

    def ours(self, service: str) -> tuple[str, str] | None:
        """(cluster id, process) when this job carries ``service``'s marker."""
        found = _MARKER.fullmatch(self.comment)
        if found is None or found.group(1) != service:
            return None
        return found.group(2), found.group(3)

    @property
    def pending_reason(self) -> str | None:
        if self.state != JobState.PENDING:
            return None
        return self.reason if self.reason and self.reason != "None" else "waiting to be scheduled"

    def describe(self) -> str:
        """How the job ended, in the service's words from Slurm's facts."""
        text = f"Slurm job {self.job_id} {self.state.value}"
        if self.exit_status:
            text += f", exit status {self.exit_status}"
        elif self.signal:
            text += f", signal {self.signal}"
        if self.reason and self.reason != "None":
            text += f" ({self.reason})"
        return text

    def scheduler_outcome(self) -> Outcome:
        """A scheduler job's end: a reap its exit status names, else a failure."""
        if self.state == JobState.FAILED and self.exit_status in REAP_REASONS:
            return Outcome(REAP_REASONS[self.exit_status])
        return Outcome.failed(f"scheduler: {self.describe()}")


def _number(value: object) -> int | None:
    """An int, or Slurm's ``{"set": true, "number": N}`` form of one."""
    if isinstance(value, dict):
        return _int(value.get("number")) if value.get("set", True) else None
    return _int(value)


def _exit(code: object) -> tuple[int | None, int | None]:
    """(exit status, signal) of a job: a wait status (22.05: high byte the exit, low the
    signal) or, from 23.02, ``{"return_code": {"number": N}, "signal": {"id": S}}``."""
    if isinstance(code, dict):
        status = _number(code.get("return_code"))
        signal = code.get("signal")
        sig = _number(signal.get("id")) if isinstance(signal, dict) else None
        return (None, sig) if sig else (status, None)
    value = _int(code)
    if value is None or value < 0:
        return None, None
    exit_status, signal = (value >> 8) & 0xFF, value & 0x7F
    return (None, signal) if signal else (exit_status, None)


def parse_queue(text: str | bytes) -> dict[int, Job]:
    """Every usable job of an ``squeue --json`` output, by id."""
    data = json.loads(text)
    jobs = data.get("jobs") if isinstance(data, dict) else None
    found: dict[int, Job] = {}
    for raw in jobs if isinstance(jobs, list) else []:
        job = Job.parse(raw)
        if job is not None:
            found[job.job_id] = job
    return found
