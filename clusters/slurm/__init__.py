"""Slurm backend: schedulers and workers as batch jobs of each tenant's own Unix user."""

from clusters.slurm.backend import SlurmBackend

__all__ = ["SlurmBackend"]
