"""Which environment variables belong to a cluster process's runtime, not to its tenant.

The service sets a cluster process's runtime environment: where it lives (HOME, TMPDIR,
PATH), how Python, the dynamic loader, the C library and OpenSSL start (PYTHON*, LD_*,
GLIBC_TUNABLES, GCONV_PATH, OPENSSL_*, ...), and Dask's configuration (DASK_*). A tenant's
variables are applied only after the process has confined itself, so none of these could
act before that anyway; they are still refused, by name, so that a tenant's setting never
silently replaces the runtime's. Everything else is the tenant's.
"""

from __future__ import annotations

import re

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"

#: Whole families of variables the runtime (or a library loaded before tenant code) reads.
RESERVED_PREFIXES = (
    "DASK_", "LD_", "PYTHON", "OPENSSL_", "SSL_", "GLIBC_", "MALLOC_", "GCONV_", "LC_",
    "NSS_", "RES_", "LOCAL", "MESOS_", "LIBPROCESS_", "SLURM_", "PROVISIONER_",
)
#: Single variables the runtime owns.
RESERVED_NAMES = frozenset({
    "HOME", "TMPDIR", "TMP", "TEMP", "PATH", "SHELL", "USER", "LOGNAME", "PWD", "OLDPWD",
    "LANG", "LANGUAGE", "TZ", "TZDIR", "LOCPATH", "NLSPATH", "HOSTALIASES", "ENV",
    "BASH_ENV", "IFS", "CDPATH", "PS4", "SHELLOPTS", "BASHOPTS", "TERMINFO",
    "XDG_CONFIG_HOME", "XDG_CONFIG_DIRS", "XDG_DATA_HOME", "XDG_DATA_DIRS",
    "XDG_CACHE_HOME", "XDG_RUNTIME_DIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
})
#: Python variables that only change output and hashing, which tenants may want.
TENANT_PYTHON = frozenset({"PYTHONHASHSEED", "PYTHONUNBUFFERED", "PYTHONWARNINGS",
                           "PYTHONFAULTHANDLER", "PYTHONDONTWRITEBYTECODE",
                           "PYTHONIOENCODING", "PYTHONUTF8"})


def env_problem(name: str, value: str) -> str | None:
    """Why a tenant may not set ``name`` (None: it may)."""
    if not re.fullmatch(NAME_PATTERN, name):
        return f"{name[:64]!r} is not a valid environment variable name"
    if name in TENANT_PYTHON:
        return None
    if name.upper() in RESERVED_NAMES or name.upper().startswith(RESERVED_PREFIXES):
        return (f"{name!r} belongs to the cluster's runtime, which the service sets; "
                "choose another name")
    if "\0" in value:
        return f"value of {name!r} contains a NUL byte"
    return None


def check_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` if a tenant may set all of it, else ValueError naming the first problem."""
    for name, value in env.items():
        problem = env_problem(name, value)
        if problem:
            raise ValueError(problem)
    return env
