"""The planner: profile a model on its devices and rank pipeline configurations (`tfpipe.plan`).

Modules: `profile` measures (per-layer time at each micro-batch size, bytes, tensor edges),
`costs` predicts one configuration's step time and per-device memory from the measurements,
`search` tries every configuration and ranks them into a `Plan`, `planner` is `tfpipe.plan`.
"""

from tfpipe.planner.costs import CostModel, Estimate, format_bytes, parse_bytes
from tfpipe.planner.planner import plan
from tfpipe.planner.profile import Edge, Profile, measure_profile
from tfpipe.planner.search import MICRO_BATCHES, SCHEDULES, Plan, PlanConfig, search

__all__ = [
    "MICRO_BATCHES",
    "SCHEDULES",
    "CostModel",
    "Edge",
    "Estimate",
    "Plan",
    "PlanConfig",
    "Profile",
    "format_bytes",
    "measure_profile",
    "parse_bytes",
    "plan",
    "search",
]
