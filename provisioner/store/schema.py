"""The state database's tables, as this release's schema version makes them
(:mod:`provisioner.migrations` brings older databases to it)."""

from __future__ import annotations

from dataclasses import fields

import sqlalchemy as sa

from provisioner.models import ClusterRecord

metadata = sa.MetaData()

clusters_table = sa.Table(
    "clusters",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("project", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("worker_cores", sa.Float, nullable=False),
    sa.Column("worker_memory", sa.BigInteger, nullable=False),
    sa.Column("scheduler_cores", sa.Float, nullable=False),
    sa.Column("scheduler_memory", sa.BigInteger, nullable=False),
    sa.Column("workers_requested", sa.Integer, nullable=False),
    sa.Column("workers_running", sa.Integer, nullable=False, default=0),
    sa.Column("idle_timeout", sa.Float, nullable=False),
    sa.Column("no_client_timeout", sa.Float, nullable=False),
    sa.Column("adaptive_minimum", sa.Integer),
    sa.Column("adaptive_maximum", sa.Integer),
    sa.Column("env", sa.JSON, nullable=False),
    sa.Column("image", sa.String(512)),
    sa.Column("environment", sa.String(64)),
    sa.Column("scheduler_address", sa.String(256)),
    sa.Column("dashboard_url", sa.String(256)),
    sa.Column("wanted", sa.String(16), nullable=False, server_default="running"),
    sa.Column("stop_reason", sa.Text),
    sa.Column("stop_detail", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("started_at", sa.Float),
    sa.Column("stopped_at", sa.Float),
    sa.Column("backend_state", sa.JSON, nullable=False),
    sa.Column("credentials", sa.JSON, nullable=False),
)

tenants_table = sa.Table(
    "tenants",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
)

#: Accounting: one row per stretch of time a cluster held a fixed amount of its tenant's quota.
#: Written in the same transaction as the change that starts or ends the stretch, so the
#: books always agree with the records.
usage_table = sa.Table(
    "usage_intervals",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("cluster_id", sa.String(32), nullable=False, index=True),
    sa.Column("tenant", sa.String(64), nullable=False, index=True),
    sa.Column("project", sa.String(128), nullable=False),
    sa.Column("cores", sa.Float, nullable=False),
    sa.Column("memory", sa.BigInteger, nullable=False),
    sa.Column("start", sa.Float, nullable=False),
    sa.Column("end", sa.Float, index=True),
)

#: What happened to each cluster and why, for people: kept as long as its record. (A table
#: new in a release is made by ``create_all`` at start; changes to tables are migration steps.)
events_table = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("cluster_id", sa.String(32), nullable=False, index=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("detail", sa.Text),
)

meta_table = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

assert {f.name for f in fields(ClusterRecord)} == {c.name for c in clusters_table.columns}, \
    "record and table disagree"
