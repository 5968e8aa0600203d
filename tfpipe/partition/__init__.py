"""Keras model -> pipeline stages: the call graph, stage boundaries and stage sub-models."""

from tfpipe.partition.graph import Graph, param_costs, read_graph
from tfpipe.partition.stages import Stage, check_gradient_paths, split, stage_io

__all__ = [
    "Graph",
    "Stage",
    "check_gradient_paths",
    "param_costs",
    "read_graph",
    "split",
    "stage_io",
]
