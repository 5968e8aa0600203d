"""Stage balancing: choose how many layer calls each stage gets from per-layer costs."""

from tfpipe.balance.profile import (
    LayerCost,
    activation_bytes_per_sample,
    by_memory,
    by_params,
    by_time,
    imbalance,
    profile_layers,
)
from tfpipe.balance.solve import solve

__all__ = [
    "LayerCost",
    "activation_bytes_per_sample",
    "by_memory",
    "by_params",
    "by_time",
    "imbalance",
    "profile_layers",
    "solve",
]
