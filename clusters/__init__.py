"""Backends that start and stop Dask schedulers and workers.

A backend gets a plain :class:`~clusters.base.ClusterSpec` and reports what happened; it
knows nothing of HTTP, tenants' quotas or persistence (it hands its state back to be stored).
"""
