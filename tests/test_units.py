"""Pure logic: sizes, tenants files, quota arithmetic, the state machine, reaping decisions."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import yaml

from provisioner.models import ClusterRecord, Status, StopReason
from provisioner.quota import OverQuota, Usage, check_fits, workers_that_fit
from provisioner.reaping import reap_reason
from provisioner.sizes import parse_bytes, parse_instant, parse_seconds
from provisioner.tenants import Quota, TenantDirectory, TenantsFileError, hash_token, load_tenants, new_token
from provisioner.watch import Report

GiB = 2**30


def record(**kw: object) -> ClusterRecord:
    base = dict(id="c-1", tenant="t", project="p", status=Status.RUNNING, worker_cores=1.0,
                worker_memory=GiB, scheduler_cores=1.0, scheduler_memory=GiB,
                workers_requested=2, idle_timeout=10.0, no_client_timeout=5.0)
    base.update(kw)
    return ClusterRecord(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "expected"), [
    ("2GiB", 2 * GiB), ("512MB", 512 * 10**6), ("1.5 gib", int(1.5 * GiB)), (1024, 1024), ("7", 7),
])
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["-1GiB", "lots", "2XB", math.nan, math.inf, -5, "1e30"])
def test_parse_bytes_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_bytes(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "expected"), [("30m", 1800), ("1h", 3600), ("45s", 45), (2.5, 2.5)])
def test_parse_seconds(text: str | float, expected: float) -> None:
    assert parse_seconds(text) == expected


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tenants.yaml"
    path.write_text(text)
    return path


def test_tenants_file_round_trip(tmp_path: Path) -> None:
    token, digest = new_token()
    path = write(tmp_path, f"""
tenants:
  - name: acme
    token_sha256: "{digest}"
    quota: {{cores: 8, memory: 16GiB, clusters: 3, workers_per_cluster: 6}}
    defaults: {{worker_cores: 1, worker_memory: 2GiB, idle_timeout: 30m, no_client_timeout: 10m}}
""")
    (acme,) = load_tenants(path)
    assert acme.quota.memory == 16 * GiB and acme.defaults.idle_timeout == 1800
    assert acme.role == "acme"
    (nested,) = load_tenants(write(tmp_path, path.read_text() + "    mesos_role: eng/acme\n"))
    assert nested.role == "eng/acme"
    directory = TenantDirectory([acme])
    assert directory.authenticate(token) is acme
    assert directory.authenticate(token + "x") is None
    assert hash_token(token) == digest


@pytest.mark.parametrize(("body", "names"), [
    ("tenants:\n  - name: acme\n    token_sha256: abc\n    quota: {cores: 1, memory: 1GiB}\n",
     ["tenant 'acme'", "token_sha256"]),
    (f"tenants:\n  - name: acme\n    token_sha256: '{'a' * 64}'\n    quota: {{cores: -1, memory: 1GiB}}\n",
     ["tenant 'acme'", "quota.cores"]),
    (f"tenants:\n  - name: acme\n    token_sha256: '{'a' * 64}'\n    quota: {{cores: 1, memory: lots}}\n",
     ["tenant 'acme'", "quota.memory"]),
    (f"tenants:\n  - name: Bad Name\n    token_sha256: '{'a' * 64}'\n    quota: {{cores: 1, memory: 1GiB}}\n",
     ["tenant 'Bad Name'", "name"]),
    (f"tenants:\n  - name: acme\n    token_sha256: '{'a' * 64}'\n    quota: {{cores: 1, memory: 1GiB}}\n"
     "    defaults: {colour: blue}\n", ["tenant 'acme'", "defaults.colour"]),
    *[(f"tenants:\n  - name: acme\n    token_sha256: '{'a' * 64}'\n    quota: {{cores: 1, memory: 1GiB}}\n"
       f"    mesos_role: '{role}'\n", ["tenant 'acme'", "mesos_role"])
      for role in ("", "/eng", "eng/", "eng//acme", "eng/../x", "*", "-x", "a b")],
    ("tenants: [\n", ["not valid YAML"]),
    ("people: []\n", ["'tenants'"]),
])
def test_bad_tenants_file_names_tenant_and_field(tmp_path: Path, body: str, names: list[str]) -> None:
    with pytest.raises(TenantsFileError) as info:
        load_tenants(write(tmp_path, body))
    for name in names:
        assert name in str(info.value)


def test_quota_message_names_limit_and_numbers() -> None:
    quota = Quota(cores=8, memory=64 * GiB, clusters=3)
    usage = Usage(clusters=1, cores=6, memory=GiB, workers=4)
    with pytest.raises(OverQuota, match=r"quota exceeded: cores 8 requested, 2 of 8 free"):
        check_fits(quota, usage, cores=8, memory=0)
    with pytest.raises(OverQuota, match=r"clusters 1 requested, 0 of 1 free"):
        check_fits(Quota(cores=8, memory=GiB, clusters=1), usage, cores=0, memory=0, clusters=1)
    check_fits(quota, usage, cores=2, memory=GiB)


def test_usage_counts_scheduler_and_workers_of_live_clusters_only() -> None:
    live = record(workers_requested=3)
    dead = record(id="c-2", status=Status.STOPPED)
    usage = Usage.of([live, dead])
    assert usage == Usage(clusters=1, cores=4.0, memory=4 * GiB, workers=3)


def test_workers_that_fit_caps_growth_at_free_quota() -> None:
    quota = Quota(cores=5, memory=64 * GiB, clusters=3)
    rec = record(workers_requested=1)
    usage = Usage.of([rec])  # 2 cores used
    assert workers_that_fit(quota, usage, rec, 10) == 4
    assert workers_that_fit(quota, usage, rec, 0) == 0


def test_state_machine_refuses_illegal_moves() -> None:
    rec = record(status=Status.STOPPED)
    with pytest.raises(ValueError):
        rec.evolve(status=Status.RUNNING)
    stopped = record().evolve(status=Status.STOPPING).evolve(status=Status.STOPPED)
    assert stopped.stopped_at is not None and stopped.cores == 0


def test_reap_reason() -> None:
    rec = record(idle_timeout=10, no_client_timeout=5)
    base = {"version": 1, "workers": [], "clients": 0, "adaptive_target": 0}
    busy = Report(**base, busy=True, idle_for=None, no_client_for=100)
    assert reap_reason(rec, busy, 50) is None
    idle_with_client = Report(**base, busy=False, idle_for=8, no_client_for=None)
    assert reap_reason(rec, idle_with_client, 1) is None
    assert reap_reason(rec, idle_with_client, 2) is StopReason.IDLE
    no_client = Report(**base, busy=False, idle_for=1, no_client_for=4)
    assert reap_reason(rec, no_client, 1) is StopReason.NO_CLIENT
    assert reap_reason(rec, None, 100) is None


def test_one_parser_of_times_for_the_api_and_the_cli() -> None:
    now = 1_800_000_000.0
    assert parse_instant("1790000000", now) == 1_790_000_000
    assert parse_instant("3600", now) == now - 3600  # small numbers are seconds ago
    assert parse_instant("7d", now) == now - 7 * 86400
    assert parse_instant("2026-01-31", now) == 1_769_817_600  # naive means UTC
    assert parse_instant("2026-01-31T01:00:00+01:00", now) == 1_769_817_600
    for bad in ("yesterday", "nan", "inf", "", "7 fortnights"):
        with pytest.raises(ValueError, match=r"neither a time|not a time"):
            parse_instant(bad, now)


def test_a_refused_create_says_the_scheduler_counts_too() -> None:
    from provisioner.quota import check_fits, cluster_costs

    record = ClusterRecord(id="c-1", tenant="t", project="p", status=Status.PENDING,
                           worker_cores=1, worker_memory=2**30, scheduler_cores=0.5,
                           scheduler_memory=2**29, workers_requested=2, idle_timeout=1,
                           no_client_timeout=1)
    with pytest.raises(OverQuota) as refused:
        check_fits(Quota(cores=2, memory=2**40, clusters=5), Usage(), cores=record.cores,
                   memory=record.memory, clusters=1, explain=cluster_costs(record))
    assert str(refused.value) == ("quota exceeded: cores 2.5 requested, 2 of 2 free "
                                  "(2 workers of 1 and the scheduler's 0.5)")


def test_a_plain_postgresql_url_means_the_installed_driver() -> None:
    from provisioner.settings import Settings

    assert Settings(state="postgresql://u:p@db:5432/prov").state_url == \
        "postgresql+psycopg://u:p@db:5432/prov"
    assert Settings(state="postgres://u@db/prov").state_url == "postgresql+psycopg://u@db/prov"
    assert Settings(state="postgresql+psycopg2://u@db/prov").state_url == \
        "postgresql+psycopg2://u@db/prov"  # a driver named is kept
    assert Settings(state="postgresql://u@db/prov").postgresql_url == "postgresql+psycopg://u@db/prov"


def test_every_serve_option_is_a_setting_its_variable_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flag, then PROVISIONER_* variable, then default, for every setting: each option of
    ``serve`` is a setting of the same name, which its variable sets when no flag is given
    (tests/test_cli.py checks on a real ``serve`` that a flag wins over its variable)."""
    import inspect

    from provisioner import cli
    from provisioner.settings import Settings

    options = [name for name in inspect.signature(cli.serve).parameters if name != "standby"]
    assert set(options) <= set(Settings.model_fields), set(options) - set(Settings.model_fields)
    source = inspect.getsource(cli.serve)
    for name in options:
        assert f'"{name}": {name}' in source, f"serve does not pass --{name} on"
    samples = {"host": "0.0.0.0", "port": "9", "tenants": "t.yaml", "state": "sqlite:///x.db",
               "data_dir": "d", "secret_key_file": "k", "backend": "mesos",
               "mesos_master": "m:5050", "mesos_command": "run", "slurm_partition": "gpu",
               "slurm_folder": "shared/jobs", "capacity_cores": "8", "capacity_memory": "16GiB",
               "keep_clusters": "true",
               "tls": "false", "max_connections": "7", "header_timeout": "3",
               "body_timeout": "4", "public_url": "https://p.example", "log_level": "debug"}
    assert set(samples) == set(options)
    for name, value in samples.items():
        monkeypatch.setenv(f"PROVISIONER_{name.upper()}", value)
    settings = Settings()
    for name in options:
        assert getattr(settings, name) != Settings.model_fields[name].default, name


def test_environments_in_the_tenants_file_are_checked(tmp_path: Path) -> None:
    from provisioner.tenants import load_environments

    def write(environments: object) -> Path:
        path = tmp_path / "tenants.yaml"
        path.write_text(yaml.safe_dump({"tenants": [{"name": "acme", "token_sha256": "a" * 64,
                                                     "quota": {"cores": 4, "memory": "8GiB"}}],
                                        "environments": environments}))
        return path

    tenants = load_tenants(write([]))
    (ml, img) = load_environments(write([{"name": "ml", "prefix": "/opt/envs/ml/"},
                                         {"name": "img", "image": "reg/ml:1", "tenants": ["acme"]}]),
                                  tenants)
    assert ml.python == "/opt/envs/ml/bin/python" and ml.allows("anyone")
    assert img.python is None and img.allows("acme") and not img.allows("other")
    for bad, says in [([{"name": "ml"}], "give a prefix"),
                      ([{"name": "ml", "prefix": "relative/env"}], "environment 'ml': prefix"),
                      ([{"name": "ml", "prefix": "/e", "tenants": ["nobody"]}], "no tenant 'nobody'"),
                      ([{"name": "ml", "prefix": "/a"}, {"name": "ml", "prefix": "/b"}],
                       "appears more than once"),
                      ([{"name": "ML!", "prefix": "/e"}], "name"),
                      ({"ml": "/e"}, "'environments' must be a list")]:
        with pytest.raises(TenantsFileError, match=re.escape(says)):
            load_environments(write(bad), tenants)
    directory = TenantDirectory(tenants, [ml, img])
    assert [e.name for e in directory.environments_of("acme")] == ["ml", "img"]
    assert directory.environment("other", "img") is None and directory.environment("other", "ml")


def test_version_differences_are_said_plainly() -> None:
    from provisioner.versions import differences, installed_versions, versions_of

    here = installed_versions()
    assert here["python"] and here["dask"] and differences(here, versions_of(sys.executable)) == []
    assert differences({"python": "3.11.7", "dask": "2024.8.0"},
                       {"python": "3.11.2", "dask": "2024.1.1", "lz4": "4.3"}) == [
        "dask 2024.8.0 here, 2024.1.1 on the cluster", "lz4 missing here, 4.3 on the cluster"]
    assert differences({"python": "3.12.1"}, {"python": "3.11.9"}) == [
        "python 3.12.1 here, 3.11.9 on the cluster"]
    with pytest.raises(ValueError, match="could not be run"):
        versions_of("/nonexistent/bin/python")
