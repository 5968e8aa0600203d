"""Replica weights: each copy of the pipeline past the first reads its stages' weights once a step.

Design: with `replicas=R` there is one set of variables, held by copy 0's devices (one
optimizer, one `.keras` file). A stage function that reads its variables directly makes copy
r > 0 fetch them across devices on every call, M times a step. So at the start of a step
copy r reads each stage's trainable variables once onto its own device
(`read_replica_weights`: one copy of each weight per copy and step), and its calls read those
tensors instead of the variables (`reading`, through `keras.StatelessScope`, the scope Keras
itself offers for stateless calls: a layer's `variable.value` then gives the mapped tensor,
cast as the variable would be under mixed precision). The copy's weight gradients are taken
with respect to those tensors. Its other state, which a call reads and writes (BatchNorm's
moving statistics, the seed generators that drive Dropout), stays the variables': the
scope records the call's writes and `reading` applies them when the call ends, as an ordinary
call would have, so every copy advances the same statistics and seeds in trace order as
before. The add_loss terms of a call under the scope are collected by it, so a stage reads
its `model.losses` inside `reading`.

Costs and choices: the read holds one copy of the stage's weights on each other copy's
device for the step (the per-call reads it replaces were each as large, M of them). Copy 0
keeps reading its own variables directly, so a pipeline without replicas traces and runs as
before. The alternative, mirrored variables on every copy kept in sync after each optimizer
step, would move as many bytes (one broadcast per step) but hold a second set of storage
between steps and a second place the weights could diverge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpipe.partition import Stage

ReplicaWeights = dict[tuple[int, int], list[tf.Tensor]]
"""`(replica r, stage k)` -> copy r's read of stage k's trainable variables, for r >= 1."""


def read_replica_weights(
    stages: Sequence[Stage], devices: Sequence[Sequence[str]]
) -> ReplicaWeights:
    """Reads every stage's trainable variables once onto each other copy's device of the stage.

    Each read is made under the name scope `replica<r>_stage<k>_weights` (how
    `tfpipe.traffic.kind_of` tells these transfers apart).

    Args:
        stages: the model's stages (their variables live on `devices[0]`).
        devices: `devices[r][k]`, the device of stage k in copy r.

    Returns:
        For each copy r >= 1 and stage k, the stage's `trainable_variables` as tensors on
        `devices[r][k]`, in order (empty without replicas).
    """
    weights: ReplicaWeights = {}
    for r in range(1, len(devices)):
        for stage in stages:
            k = stage.index
            with tf.device(devices[r][k]), tf.name_scope(f"replica{r}_stage{k}_weights"):
                weights[(r, k)] = [tf.identity(v.value) for v in stage.trainable_variables]
    return weights


@contextlib.contextmanager
def reading(
    model: keras.Model, variables: Sequence[keras.Variable], weights: Sequence[Any] | None
) -> Iterator[None]:
    """While active, calls of `model` read `weights` in place of `variables`.

    Writes the calls make to `model`'s other variables (BatchNorm statistics, seed-generator
    states) are applied when the block ends. `model.losses` read inside the block gives the
    calls' add_loss terms (and weight regularisers computed from `weights`).

    Args:
        model: the stage's model.
        variables: the variables to stand in for (the stage's trainable variables).
        weights: one tensor per variable (same shape and dtype), or None: then the block
            reads the variables themselves and nothing changes.
    """
    if weights is None:
        yield
        return
    mapping = list(zip(variables, weights))
    # initialize_variables=False: the stage makes no variables, and leaving the scope must not
    # initialise variables others deferred (Keras would make them on the default device)
    with keras.StatelessScope(mapping, collect_losses=True, initialize_variables=False) as scope:
        yield
    mapped = {id(v) for v in variables}
    for v in model.variables:
        new = None if id(v) in mapped else scope.get_current_value(v)
        if new is not None:
            v.assign(new)
