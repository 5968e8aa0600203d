"""Sums each stage's gradients over its data-parallel replicas with TensorFlow collective ops.

Design: with `replicas=R` the executor runs R copies of the K-stage schedule, copy r on its own
K devices and on micro-batches `r*M .. r*M+M-1` of the batch; every copy reads the one set of
variables (held by copy 0's devices), so there is one optimizer and one set of `.keras`
weights, exactly as without replicas. After the last backward, stage k's accumulated gradients
on its R devices are all-reduced with `CollectiveReduceV2` (TensorFlow's ring all-reduce, the
op behind `MultiWorkerMirroredStrategy`), and copy 0's result feeds the optimizer step on the
variable's device. Each device gets a resource "ordering token" as tf.distribute's launcher
does: it orders the collectives of one device and keeps every participant in the graph (a
participant whose result is unused would otherwise be pruned and the others would wait
forever). Sparse gradients (IndexedSlices from embeddings) are not all-reduced: collectives
need equal shapes, and Keras's optimizers need the full batch's slice structure, so their
parts are gathered onto copy 0's device in replica order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from tfpipe._keras import collective_sum

# Group keys of tf.distribute's CollectiveKeys start at 1; keep well clear of them.
_GROUP_KEYS = itertools.count(1_000_000)
_INSTANCE_KEYS = itertools.count(1_000_000)


class ReplicaReducer:
    """All-reduces per-stage gradients over the R replicas of a pipeline.

    Args:
        devices: `devices[r][k]`, the device of stage k in replica r (R >= 2 rows of K).

    Example:
        >>> reducer = ReplicaReducer([["/device:CPU:0", "/device:CPU:1"],
        ...                           ["/device:CPU:2", "/device:CPU:3"]])
        >>> summed = reducer.reduce(0, [grads_on_cpu0, grads_on_cpu2])  # on CPU:0
    """

    def __init__(self, devices: Sequence[Sequence[str]]) -> None:
        self.devices = [list(row) for row in devices]
        self.replicas = len(self.devices)
        stages = len(self.devices[0])
        self.group_keys = [next(_GROUP_KEYS) for _ in range(stages)]
        self.tokens: list[list[tf.Variable]] = []
        with tf.init_scope():
            for row in self.devices:
                tokens = []
                for device in row:
                    with tf.device(device):
                        tokens.append(tf.Variable(0.0, trainable=False, name="tfpipe_order"))
                self.tokens.append(tokens)

    def reduce(self, stage: int, grads: Sequence[Sequence[Any]]) -> list[Any]:
        """Sums stage `stage`'s gradients over replicas.

        Args:
            stage: the stage index k.
            grads: `grads[r][i]`, replica r's accumulated gradient of the stage's i-th
                trainable variable (a dense tensor, an IndexedSlices, or a list of
                IndexedSlices parts, or None for a variable the stage holds but does not
                use: the same in every replica), on device `devices[r][k]`.

        Returns:
            The summed gradient of each variable, on replica 0's device of the stage: dense
            ones all-reduced, sparse ones as the list of every replica's parts, in order.
        """
        out: list[Any] = []
        for i, first in enumerate(grads[0]):
            parts = [grads[r][i] for r in range(self.replicas)]
            if first is None:  # the stage holds the variable but its calls do not use it
                out.append(None)
                continue
            if isinstance(first, (list, tf.IndexedSlices)):
                out.append(_gathered(parts))
                continue
            key = next(_INSTANCE_KEYS)
            reduced = []
            for r, g in enumerate(parts):
                with tf.device(self.devices[r][stage]):
                    reduced.append(
                        collective_sum(
                            tf.convert_to_tensor(g),
                            group_size=self.replicas,
                            group_key=self.group_keys[stage],
                            instance_key=key,
                            ordering_token=self.tokens[r][stage].handle,
                        )
                    )
            out.append(reduced[0])
        return out


def _gathered(parts: Sequence[Any]) -> list[tf.IndexedSlices]:
    """Every replica's IndexedSlices parts of one variable, replica 0's first."""
    flat: list[tf.IndexedSlices] = []
    for p in parts:
        flat.extend(p if isinstance(p, list) else [p])
    return flat
