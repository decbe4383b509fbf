"""dask-provisioner: per-tenant Dask clusters on demand.

The core (this package) knows tenants, quotas, cluster records and their life; it knows
nothing of HTTP (see ``api``) and nothing of a particular backend (see ``clusters``).
"""

__version__ = "0.1.0"
