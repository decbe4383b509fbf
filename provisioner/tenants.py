"""Tenants: who may ask for clusters, how much they may hold, and what they get by default.

Tenants come from a YAML file (tokens only as SHA-256 hashes) or, with no file, a single
``default`` tenant sized to this machine. A bad file stops start-up with a message that names
the tenant and the field.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from clusters.base import BatchPlacement
from clusters.runtime_env import check_env
from provisioner.sizes import parse_bytes, parse_seconds

Bytes = Annotated[int, BeforeValidator(parse_bytes), Field(ge=0)]
Seconds = Annotated[float, BeforeValidator(parse_seconds), Field(ge=0)]
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class TenantsFileError(Exception):
    """The tenants file cannot be used; the message says where and why."""


class Guarantee(BaseModel):
    """The part of a quota a tenant is sure to get: never preempted, and what it asks within
    it takes borrowed workers back from others."""

    model_config = ConfigDict(extra="forbid")
    cores: float = Field(ge=0)
    memory: Bytes


class Quota(BaseModel):
    """Totals across all of a tenant's live clusters, schedulers included (the ceiling), and
    optionally the guaranteed part of them; what it holds above that is borrowed."""

    model_config = ConfigDict(extra="forbid")
    cores: float = Field(gt=0)
    memory: Bytes
    clusters: int = Field(default=10, ge=1)
    workers_per_cluster: int | None = Field(default=None, ge=0)
    guaranteed: Guarantee | None = None

    @model_validator(mode="after")
    def _guarantee_within(self) -> Quota:
        g = self.guaranteed
        if g is not None and (g.cores > self.cores + 1e-9 or g.memory > self.memory):
            raise ValueError("guaranteed must not be more than the quota's cores and memory")
        return self


class Defaults(BaseModel):
    """What a cluster gets when the request leaves a field out, and the bounds of timeouts."""

    model_config = ConfigDict(extra="forbid")
    worker_cores: float = Field(default=1, ge=0.01)
    worker_memory: Bytes = 2 * 2**30
    scheduler_cores: float = Field(default=1, ge=0.01)
    scheduler_memory: Bytes = 2**30
    idle_timeout: Seconds = 1800
    no_client_timeout: Seconds = 600
    max_idle_timeout: Seconds = 86400
    max_no_client_timeout: Seconds = 86400


#: Slurm account, partition and QOS names: what sbatch takes as one plain word.
SLURM_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"


def check_mesos_role(role: str) -> str:
    """Mesos's rules for role names (a refused role would stop the framework subscribing)."""
    if not role or role.startswith("/") or role.endswith("/") or "//" in role:
        raise ValueError("must not be empty, start or end with '/', or contain '//'")
    for part in role.split("/"):
        if part in (".", "..", "*") or part.startswith("-") or re.search(r"[\s\x08]", part):
            raise ValueError(f"component {part!r} is not allowed (., .., *, a leading '-', "
                             "whitespace)")
    return role


class Tenant(BaseModel):
    """One tenant: name, token hashes, quota, defaults, and its Mesos role."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    token_sha256: list[str] = Field(min_length=1)
    quota: Quota
    defaults: Defaults = Defaults()
    mesos_role: Annotated[str, AfterValidator(check_mesos_role)] | None = None
    #: On Slurm: the Unix user its jobs run as (default: the tenant's name; never root, never
    #: another tenant's), the account they are charged to (default: the tenant's name), and
    #: optionally a partition and a QOS.
    slurm_user: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    slurm_account: str | None = Field(default=None, pattern=SLURM_NAME)
    slurm_partition: str | None = Field(default=None, pattern=SLURM_NAME)
    slurm_qos: str | None = Field(default=None, pattern=SLURM_NAME)
    #: A create that does not fit now waits in the queue (201, status queued) unless this is
    #: false or the request says ``queue: false`` (403, as before queues).
    queue: bool = True
    #: Its weight in the fair order of the queue (a tenant of weight 2 may hold twice as much).
    weight: float = Field(default=1.0, gt=0)
    env: dict[str, str] = {}

    @model_validator(mode="before")
    @classmethod
    def _tokens_as_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("token_sha256"), str):
            data = {**data, "token_sha256": [data["token_sha256"]]}
        return data

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        return check_env(env)

    @field_validator("token_sha256")
    @classmethod
    def _hex_digests(cls, digests: list[str]) -> list[str]:
        for digest in digests:
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError("must be 64 lowercase hex characters (a SHA-256 of the token)")
        return digests

    @property
    def role(self) -> str:
        return self.mesos_role or self.name

    @property
    def batch(self) -> BatchPlacement:
        """Where its Slurm jobs run, and as whom."""
        return BatchPlacement(user=self.slurm_user or self.name,
                              account=self.slurm_account or self.name,
                              partition=self.slurm_partition, qos=self.slurm_qos)


class Environment(BaseModel):
    """A named Python environment clusters may run in, registered by the operator: a venv or
    conda prefix whose ``bin/python`` runs the cluster's processes (on this machine, or at the
    same path on Mesos agents), and/or an image Mesos tasks run in. ``tenants`` names who may
    use it (every tenant when left out)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    prefix: str | None = Field(default=None, pattern=r"^/[^\x00-\x1f\x7f]*$", max_length=512)
    image: str | None = Field(default=None, pattern=r"^[^\s\x00-\x1f\x7f]+$", max_length=512)
    tenants: list[str] | None = None

    @model_validator(mode="after")
    def _somewhere(self) -> Environment:
        if self.prefix is None and self.image is None:
            raise ValueError("give a prefix (a venv or conda folder), an image, or both")
        return self

    @property
    def python(self) -> str | None:
        return f"{self.prefix.rstrip('/')}/bin/python" if self.prefix else None

    def allows(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants


def check_slurm_users(tenants: list[Tenant]) -> None:
    """On Slurm each tenant's jobs run as its own Unix user: it must exist, must not be
    root, and no two tenants may share one (jobs of one uid can signal and read each other)."""
    import pwd

    errors: list[str] = []
    owners: dict[int, str] = {}
    for t in tenants:
        user = t.batch.user
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            errors.append(f"tenant {t.name!r}: Slurm user {user!r} does not exist "
                          "(create it, or set slurm_user)")
            continue
        if uid == 0:
            errors.append(f"tenant {t.name!r}: slurm_user must not be root")
        elif uid in owners:
            errors.append(f"tenants {owners[uid]!r} and {t.name!r} share the Unix user "
                          f"{user!r}: each tenant needs its own")
        owners.setdefault(uid, t.name)
    if errors:
        raise TenantsFileError("; ".join(errors))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh random token and its SHA-256 (what goes into the tenants file)."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


class TenantDirectory:
    """Looks tenants up by token in constant time per stored hash."""

    def __init__(self, tenants: list[Tenant], environments: list[Environment] | None = None,
                 ) -> None:
        self._tenants = {t.name: t for t in tenants}
        self._by_hash = {digest: t for t in tenants for digest in t.token_sha256}
        self.environments = {e.name: e for e in environments or []}
        #: Each environment's versions (python and key packages), read at start.
        self.versions: dict[str, dict[str, str]] = {}

    def environments_of(self, tenant: str) -> list[Environment]:
        return [e for e in self.environments.values() if e.allows(tenant)]

    def environment(self, tenant: str, name: str) -> Environment | None:
        """The environment ``name`` if this tenant may use it."""
        found = self.environments.get(name)
        return found if found is not None and found.allows(tenant) else None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._tenants.values())

    def get(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def authenticate(self, token: str) -> Tenant | None:
        digest = hash_token(token)
        found = None
        for known, tenant in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                found = tenant
        return found


def _describe(error: ValidationError, index: int, raw: Any) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    who = f"tenant {name!r}" if name else f"tenant #{index + 1}"
    parts = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(entry)"
        parts.append(f"{field}: {err['msg']}")
    return f"{who}: " + "; ".join(parts)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TenantsFileError(f"cannot read tenants file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise TenantsFileError(f"tenants file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tenants"), list):
        raise TenantsFileError(f"tenants file {path} must have a top-level list 'tenants'")
    return data


def load_environments(path: str | Path, tenants: list[Tenant]) -> list[Environment]:
    """The file's ``environments`` list (none when it has no such key), validated: unique
    names, only tenants the file defines."""
    path = Path(path)
    raw = _read(path).get("environments") or []
    if not isinstance(raw, list):
        raise TenantsFileError(f"tenants file {path}: 'environments' must be a list")
    found: list[Environment] = []
    errors: list[str] = []
    known = {t.name for t in tenants}
    for index, entry in enumerate(raw):
        name = entry.get("name") if isinstance(entry, dict) else None
        who = f"environment {name!r}" if name else f"environment #{index + 1}"
        try:
            env = Environment.model_validate(entry)
        except ValidationError as exc:
            errors.append(who + ": " + "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(entry)'}: {e['msg']}"
                for e in exc.errors()))
            continue
        unknown = sorted(set(env.tenants or []) - known)
        if unknown:
            errors.append(f"{who}: tenants: no tenant {', '.join(map(repr, unknown))}")
        found.append(env)
    names = [e.name for e in found]
    for name in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"environment {name!r}: name appears more than once")
    if errors:
        raise TenantsFileError(f"tenants file {path}: " + " | ".join(errors))
    return found


def load_tenants(path: str | Path) -> list[Tenant]:
    """Parse and validate a tenants file; raise TenantsFileError naming tenant and field."""
    path = Path(path)
    data = _read(path)
    tenants: list[Tenant] = []
    errors: list[str] = []
    for index, raw in enumerate(data["tenants"]):
        try:
            tenants.append(Tenant.model_validate(raw))
        except ValidationError as exc:
            errors.append(_describe(exc, index, raw))
    names = [t.name for t in tenants]
    for name in {n for n in names if names.count(n) > 1}:
        errors.append(f"tenant {name!r}: name appears more than once")
    digests = [d for t in tenants for d in t.token_sha256]
    if len(digests) != len(set(digests)):
        errors.append("the same token_sha256 is given to more than one tenant")
    if not tenants and not errors:
        errors.append("no tenants defined")
    if errors:
        raise TenantsFileError(f"tenants file {path}: " + " | ".join(errors))
    return tenants


def machine_tenant(token_sha256: str) -> Tenant:
    """The embedded default: one tenant 'default' sized to this machine."""
    cores = float(os.cpu_count() or 1)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 4 * 2**30
    return Tenant(
        name="default",
        token_sha256=[token_sha256],
        # Room for a few small clusters at once even on 2 cores (cluster processes share the
        # machine's cores; the quota caps what each cluster may use of them).
        quota=Quota(cores=max(cores * 4, 8), memory=memory, clusters=10),
        # A scheduler mostly waits: half a core.
        defaults=Defaults(worker_cores=1, worker_memory=min(2 * 2**30, memory // 4),
                          scheduler_cores=0.5, scheduler_memory=min(2**30, memory // 8)),
    )
