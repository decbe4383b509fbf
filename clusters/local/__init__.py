"""The embedded default backend: schedulers and workers as processes on this machine."""

from clusters.local.backend import LocalBackend

__all__ = ["LocalBackend"]
