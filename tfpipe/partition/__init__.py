"""Keras model -> pipeline stages: the call graph, allowed cuts and stage sub-models."""

from tfpipe.partition.graph import Graph, read_graph
from tfpipe.partition.stages import Stage, allowed_cuts, split

__all__ = ["Graph", "Stage", "allowed_cuts", "read_graph", "split"]
