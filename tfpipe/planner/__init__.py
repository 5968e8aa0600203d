"""The planner: profile a model on its devices and rank pipeline configurations (`tfpipe.plan`).

Modules: `records` holds the measurements as plain data (`Profile`, `Edge`), `profile` fills
them (per-layer time at each micro-batch size, bytes, tensor edges), `costs` predicts one
configuration's step time and per-device memory from them, `search` tries every configuration
and ranks them into a `Plan` (`result`), `planner` is `tfpipe.plan`.
"""

from tfpipe.planner.costs import CostModel, Estimate, format_bytes, parse_bytes
from tfpipe.planner.planner import plan
from tfpipe.planner.profile import measure_profile
from tfpipe.planner.records import Edge, Profile
from tfpipe.planner.result import Plan, PlanConfig
from tfpipe.planner.search import MICRO_BATCHES, SCHEDULES, search

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
