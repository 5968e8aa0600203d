"""Keras model -> pipeline stages: the call graph, stage boundaries and stage sub-models."""

from tfpipe.partition.graph import Graph, param_costs, read_graph
from tfpipe.partition.stages import Stage, split, stage_io

__all__ = ["Graph", "Stage", "param_costs", "read_graph", "split", "stage_io"]
