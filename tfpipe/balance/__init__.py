"""Stage balancing: choose how many layers each stage gets from per-layer costs."""

from tfpipe.balance.solve import solve

__all__ = ["solve"]
