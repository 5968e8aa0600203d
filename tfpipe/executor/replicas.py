"""Sums each stage's gradients over its data-parallel replicas onto copy 0's device of the stage.

Design: with `replicas=R` the executor runs R copies of the K-stage schedule, copy r on its own
K devices and on micro-batches `r*M .. r*M+M-1` of the batch; there is one set of variables
(held by copy 0's devices), so one optimizer and one set of `.keras` weights, exactly as
without replicas, and each copy r > 0 reads its stages' weights once a step
(`tfpipe.executor.weights`). After the last backward, stage k's accumulated gradients are
summed onto copy 0's device of the stage, where the optimizer step uses them:

- R = 2: copy 1 sends each dense gradient sum to copy 0's device, where it is added: one
  gradient per variable crosses, the least a reduction can move, and the sum is the one
  result (an all-reduce would make a second, on copy 1, that nothing reads). They are plain
  transfers, so `tfpipe.traffic.placed_transfers` sees them (a collective's messages are
  not in the placed partition graphs), and their readers, the adds, are made under the
  scope `stage<k>_reduce` (`tfpipe.executor.grads.all_reduce`), by which
  `tfpipe.traffic.kind_of` tells them apart.
- R > 2: a collective all-reduce (`CollectiveReduceV2`, the op behind
  `MultiWorkerMirroredStrategy`) per stage, dtype and pack: each copy concatenates its
  flattened dense gradients into packs of up to `PACK_BYTES` (a handful of collectives per
  stage instead of one per variable, each paying a launch and a round of messages), and copy
  0 splits its result back. With NCCL when every device is a GPU of its own
  (`communication_hint`), else TensorFlow's default (ring). Each device gets a resource
  "ordering token" as tf.distribute's launcher does: it orders the collectives of one
  device and keeps every participant in the graph (a participant whose result is unused
  would otherwise be pruned and the others would wait forever).
- Sparse gradients (IndexedSlices from embeddings) are not summed: Keras's optimizers need
  the full batch's slice structure, so their parts are gathered onto copy 0's device in
  replica order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import tensorflow as tf

from tfpipe._keras import collective_sum
from tfpipe.devices import is_local

# Group keys of tf.distribute's CollectiveKeys start at 1; keep well clear of them.
_GROUP_KEYS = itertools.count(1_000_000)
_INSTANCE_KEYS = itertools.count(1_000_000)

PACK_BYTES = 32 * 2**20
"""The most bytes of dense gradients concatenated into one collective (R > 2); a larger
gradient goes alone, unconcatenated."""


def communication_hint(devices: Iterable[str], split_gpus: bool | None = None) -> str:
    """The collective implementation for `devices`: `"nccl"` when every one is a GPU, else
    `"auto"` (TensorFlow's ring over its own transport).

    NCCL takes one rank per physical GPU, so logical GPUs that split one (as
    `benchmarks/gpu.py` makes) get `"auto"` too. That is known only of this process's own
    GPUs: a worker's are taken to be whole.

    Args:
        devices: the devices of the collective's group.
        split_gpus: whether this process's logical GPUs split physical ones; None asks
            TensorFlow (only when some device is a local GPU).

    Example:
        >>> communication_hint(["/device:GPU:0", "/job:worker/replica:0/task:1/device:GPU:0"],
        ...                    split_gpus=False)
        'nccl'
        >>> communication_hint(["/device:GPU:0", "/device:CPU:0"])
        'auto'
    """
    specs = [tf.DeviceSpec.from_string(d) for d in devices]
    if {s.device_type for s in specs} != {"GPU"}:
        return "auto"
    if any(is_local(d) for d in devices):
        if split_gpus is None:
            logical = tf.config.list_logical_devices("GPU")
            split_gpus = len(logical) > len(tf.config.list_physical_devices("GPU"))
        if split_gpus:
            return "auto"
    return "nccl"


def packs(sizes: Sequence[tuple[int, tf.DType]], limit: int = PACK_BYTES) -> list[list[int]]:
    """Groups tensors into packs for collectives: consecutive ones of one dtype, each pack at
    most `limit` bytes (a larger tensor alone).

    Args:
        sizes: per tensor, its element count and dtype.
        limit: the most bytes of one pack.

    Returns:
        The packs, as lists of indices into `sizes`, in order of their first tensor.

    Example:
        >>> packs([(4, tf.float32), (2, tf.float32), (8, tf.float32)], limit=24)
        [[0, 1], [2]]
    """
    groups: dict[tf.DType, list[list[int]]] = {}
    filled: dict[tf.DType, int] = {}
    for i, (n, dtype) in enumerate(sizes):
        nbytes = n * dtype.size
        lists = groups.setdefault(dtype, [])
        if not lists or filled[dtype] + nbytes > limit:
            lists.append([])
            filled[dtype] = 0
        lists[-1].append(i)
        filled[dtype] += nbytes
    return sorted((p for lists in groups.values() for p in lists), key=lambda p: p[0])


class ReplicaReducer:
    """Sums per-stage gradients over the R replicas of a pipeline, onto copy 0's devices.

    Args:
        devices: `devices[r][k]`, the device of stage k in replica r (R >= 2 rows of K).

    Attributes:
        hint: the collectives' `communication_hint` (`"nccl"` on GPUs; unused with R = 2).

    Example:
        >>> reducer = ReplicaReducer([["/device:CPU:0", "/device:CPU:1"],
        ...                           ["/device:CPU:2", "/device:CPU:3"]])
        >>> summed = reducer.reduce(0, [grads_on_cpu0, grads_on_cpu2])  # on CPU:0
    """

    def __init__(self, devices: Sequence[Sequence[str]]) -> None:
        self.devices = [list(row) for row in devices]
        self.replicas = len(self.devices)
        stages = len(self.devices[0])
        self.hint = communication_hint(d for row in self.devices for d in row)
        self.group_keys = [next(_GROUP_KEYS) for _ in range(stages)]
        self.tokens: list[list[tf.Variable]] = []
        if self.replicas == 2:
            return  # no collectives
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
            ones summed, sparse ones as the list of every replica's parts, in order.
        """
        out: list[Any] = []
        dense: list[int] = []
        for i, first in enumerate(grads[0]):
            if first is None:  # the stage holds the variable but its calls do not use it
                out.append(None)
            elif isinstance(first, (list, tf.IndexedSlices)):
                out.append(_gathered([grads[r][i] for r in range(self.replicas)]))
            else:
                out.append(None)
                dense.append(i)
        rows = [[tf.convert_to_tensor(grads[r][i]) for i in dense] for r in range(self.replicas)]
        summed = self._sent_and_added(stage, rows) if self.replicas == 2 else (
            self._all_reduced(stage, rows))
        for i, g in zip(dense, summed):
            out[i] = g
        return out

    def _sent_and_added(self, stage: int, rows: list[list[tf.Tensor]]) -> list[tf.Tensor]:
        """R = 2: copy 1's sums sent to copy 0's device and added there."""
        with tf.device(self.devices[0][stage]):
            return [a + b for a, b in zip(rows[0], rows[1])]

    def _all_reduced(self, stage: int, rows: list[list[tf.Tensor]]) -> list[tf.Tensor]:
        """R > 2: one collective per pack; copy 0's result split back into gradients."""
        if not rows[0]:
            return []
        shapes = [g.shape for g in rows[0]]
        sizes = [(_num_elements(g), g.dtype) for g in rows[0]]
        out: list[tf.Tensor] = [tf.zeros(())] * len(shapes)
        for pack in packs(sizes):
            key = next(_INSTANCE_KEYS)
            reduced = []
            for r, row in enumerate(rows):
                with tf.device(self.devices[r][stage]):
                    flat = [tf.reshape(row[i], [-1]) for i in pack]
                    reduced.append(collective_sum(
                        flat[0] if len(flat) == 1 else tf.concat(flat, 0),
                        group_size=self.replicas, group_key=self.group_keys[stage],
                        instance_key=key, ordering_token=self.tokens[r][stage].handle,
                        communication_hint=self.hint,
                    ))
            with tf.device(self.devices[0][stage]):
                parts = tf.split(reduced[0], [sizes[i][0] for i in pack])
                for i, part in zip(pack, parts):
                    out[i] = tf.reshape(part, shapes[i])
        return out


def _num_elements(t: tf.Tensor) -> int:
    n = t.shape.num_elements()
    assert n is not None, f"a weight gradient of unknown shape {t.shape}"
    return int(n)


def _gathered(parts: Sequence[Any]) -> list[tf.IndexedSlices]:
    """Every replica's IndexedSlices parts of one variable, replica 0's first."""
    flat: list[tf.IndexedSlices] = []
    for p in parts:
        flat.extend(p if isinstance(p, list) else [p])
    return flat
