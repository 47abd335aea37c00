"""Plumbing shared by every experiment: config, run directory, seeding, device and
precision, distributed, logging, checkpoint/resume, the training loop, reports, sweeps."""
from .errors import UsageError

__all__ = ["UsageError"]
