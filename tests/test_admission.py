"""Admission: create, scale and adapt read one request the same way (provisioner.admission)."""

from __future__ import annotations

import re

import pytest

from provisioner.admission import InvalidRequest, adaptive_size, fixed_size
from provisioner.quota import OverQuota
from provisioner.tenants import Defaults, Quota, Tenant

GiB = 2**30


def _tenant(limit: int | None) -> Tenant:
    return Tenant(name="t", token_sha256=["0" * 64],
                  quota=Quota(cores=8, memory=16 * GiB, clusters=3, workers_per_cluster=limit),
                  defaults=Defaults())


def test_a_fixed_count_defaults_to_one_and_is_refused_past_the_limit() -> None:
    assert fixed_size(_tenant(4), None).workers == 1
    assert fixed_size(_tenant(4), 4).workers == 4
    with pytest.raises(OverQuota, match="workers_per_cluster 5 requested, limit is 4"):
        fixed_size(_tenant(4), 5)
    with pytest.raises(InvalidRequest, match="workers: must not be negative"):
        fixed_size(_tenant(None), -1)


def test_an_adaptive_maximum_is_clamped_the_same_way_on_create_and_adapt() -> None:
    tenant = _tenant(4)
    created = adaptive_size(tenant, None, 50, field="adaptive.minimum")
    adapted = adaptive_size(tenant, 0, 50, current=2)
    assert (created.adaptive_minimum, created.adaptive_maximum, created.workers) == (0, 4, 0)
    assert (adapted.adaptive_minimum, adapted.adaptive_maximum, adapted.workers) == (0, 4, 2)
    # No limit: the maximum stands.
    assert adaptive_size(_tenant(None), 1, 50).adaptive_maximum == 50


def test_adaptive_bounds_keep_the_current_count_inside_them() -> None:
    tenant = _tenant(None)
    assert adaptive_size(tenant, 2, 5, current=0).workers == 2
    assert adaptive_size(tenant, 2, 5, current=9).workers == 5
    assert adaptive_size(tenant, 2, 5, current=3).workers == 3


def test_adaptive_bounds_that_cannot_hold_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidRequest, match=re.escape("adaptive.minimum: 3 is more than maximum 2")):
        adaptive_size(_tenant(None), 3, 2, field="adaptive.minimum")
    with pytest.raises(OverQuota, match="workers_per_cluster 5 requested"):
        adaptive_size(_tenant(4), 5, 6)


def test_an_adaptive_maximum_left_out_is_what_the_quota_allows_beside_the_scheduler() -> None:
    from provisioner.admission import largest
    from provisioner.models import ClusterRecord, Status

    record = ClusterRecord(id="c-1", tenant="t", project="p", status=Status.RUNNING,
                           worker_cores=1, worker_memory=GiB, scheduler_cores=0.5,
                           scheduler_memory=GiB, workers_requested=0, idle_timeout=1,
                           no_client_timeout=1)
    assert largest(_tenant(None), record) == 7  # cores: (8 - 0.5) // 1; memory allows 15
    assert largest(_tenant(4), record) == 4  # the per-cluster limit is lower
    big = record.evolve(worker_memory=6 * GiB)
    assert largest(_tenant(None), big) == 2  # memory: (16 - 1) // 6
