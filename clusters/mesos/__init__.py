"""Mesos backend: one framework on the v1 scheduler HTTP API, tenants as roles."""

from clusters.mesos.backend import MesosBackend

__all__ = ["MesosBackend"]
