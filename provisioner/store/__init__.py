"""The state store: cluster records, tenants and service metadata in SQL (SQLite or PostgreSQL).

Every method is blocking and runs in the store's own small thread pool, so the event loop
never waits on the database. One module per job: :mod:`.schema` (tables), :mod:`.database`
(engine, transactions, start-up), :mod:`.cluster_rows` (records), :mod:`.quota_writes`
(admission under the tenant's lock), :mod:`.accounting` (usage over time), :mod:`.events`
(what happened to each cluster), :mod:`.meta`.
"""

from __future__ import annotations

from provisioner.store.accounting import Accounting
from provisioner.store.database import NotFound, StoreError, make_engine
from provisioner.store.events import Event, EventLog
from provisioner.store.meta import ServiceMeta
from provisioner.store.quota_writes import QuotaWrites
from provisioner.store.schema import clusters_table, meta_table, tenants_table, usage_table

__all__ = ["Accounting", "Event", "NotFound", "Store", "StoreError", "clusters_table", "make_engine",
           "meta_table", "tenants_table", "usage_table"]


class Store(QuotaWrites, ServiceMeta, EventLog):
    """Cluster records and metadata; async methods backed by a private thread pool.

    Cluster credentials are sealed with the keyring in the one place rows become records and
    back, so every read and write goes through it, in the store's threads.
    """
