"""The least bytes a pipelined step must move between devices, known from its cuts alone.

Design: `Pipeline.summary()` cannot run a step, but the cuts fix what must cross: per copy
of the pipeline and micro-batch, each tensor a stage reads that a stage on another device
made, once to each device that reads it (TensorFlow's partitioner sends a tensor once per
receiving device), and a float one's gradient once back from each such device (the
executor sums the gradients of one device's readers there, `tfpipe.executor.dataflow`).
Sizes come from the static shapes of the user's graph, so a dimension known only from the
data (a sequence length left `None`) shows as `?`. The data's own transfers (inputs from the
host, labels to the last stage) need the data: `Pipeline.traffic(x, y)` measures them, and
the summary shows its latest per-pair totals beside these figures, for its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from tfpipe.balance.profile import static_bytes_per_sample
from tfpipe.partition import Stage, read_graph
from tfpipe.report import format_bytes, text_table
from tfpipe.traffic import Pair, StepTraffic


def least_traffic(
    stages: Sequence[Stage],
    replica_devices: Sequence[Sequence[str]],
    model_outputs: Sequence[Any],
    micro_batches: int,
    batch: int | None = None,
) -> dict[Pair, dict[str, float | None]]:
    """The boundary activations a training step must send between devices, and their gradients.

    Per copy of the pipeline, each tensor a stage reads that a stage on another device made
    (the last stage also reads the model outputs made before it, for the loss) crosses once
    per micro-batch to each device that reads it, as TensorFlow's partitioner sends it; a
    float one's gradient crosses back once from each such device (the gradients of one
    device's readers are summed there, `tfpipe.executor.dataflow`). This is what
    `Pipeline.traffic` measures as `activations` and `gradients`; the data's inputs and
    labels, replicas' weights and scalars are not counted here.

    Args:
        stages: the pipeline's stages, with their `inputs` and `outputs` KerasTensors.
        replica_devices: `replica_devices[r][k]`, the device of stage k in copy r.
        model_outputs: the model's output KerasTensors, flat.
        micro_batches: M, micro-batches per copy (how a batch is shared among copies).
        batch: samples per step B; None gives bytes per sample (of each copy's share).

    Returns:
        `{(source, target): {"activations": bytes, "gradients": bytes}}` for each pair that
        must send any; a figure is None where a tensor's shape after the batch dimension is
        not static. Empty for an opaque model (one stage).

    Example:
        >>> outputs = keras.tree.flatten(tfpipe.partition.read_graph(model).outputs)
        >>> least_traffic(pipe.stages, pipe.replica_devices, outputs, micro_batches=2)
        {('/device:CPU:1', '/device:CPU:2'): {'activations': 256.0, 'gradients': 0.0}, ...}
    """
    if stages[0].inputs is None:
        return {}
    made_by = {id(t): st.index for st in stages for t in st.outputs or []}
    early = [t for t in model_outputs if made_by.get(id(t), len(stages) - 1) != len(stages) - 1]
    pairs: dict[Pair, dict[str, float | None]] = {}

    def add(pair: Pair, kind: str, nbytes: float | None) -> None:
        row = pairs.setdefault(pair, {"activations": 0.0, "gradients": 0.0})
        old = row[kind]
        row[kind] = None if old is None or nbytes is None else old + nbytes

    for r, devices in enumerate(replica_devices):
        samples = 1 if batch is None else copy_samples(batch, micro_batches,
                                                       len(replica_devices), r)
        seen: set[tuple[int, str]] = set()
        for st in stages:
            for t in [*(st.inputs or []), *(early if st.index == len(stages) - 1 else [])]:
                source, target = devices[made_by.get(id(t), st.index)], devices[st.index]
                if source == target or (id(t), target) in seen:
                    continue  # a model input, made on this device, or already sent here
                seen.add((id(t), target))
                size = static_bytes_per_sample(t, unknown=-1.0)
                nbytes = None if size < 0 else size * samples
                add((source, target), "activations", nbytes)
                if tf.as_dtype(t.dtype).is_floating:
                    add((target, source), "gradients", nbytes)
    return pairs


def copy_samples(batch: int, micro_batches: int, replicas: int, r: int) -> int:
    """Samples copy r of `replicas` takes from a batch: its run of M of the R*M micro-batches
    (`tfpipe.executor.microbatch`: the first `B % (R*M)` micro-batches hold one more)."""
    n = micro_batches * replicas
    return sum(batch // n + (m < batch % n) for m in range(r * micro_batches,
                                                            (r + 1) * micro_batches))


def summary_lines(
    model: Any,
    stages: Sequence[Stage],
    replica_devices: Sequence[Sequence[str]],
    micro_batches: int,
    last: StepTraffic | None,
) -> list[str]:
    """The traffic part of `Pipeline.summary()`: `least_traffic` per pair of devices, per
    sample, or for the batch of the last measured step with what it sent beside it.

    Args:
        model: the user's model (its outputs, its trainable weights).
        stages, replica_devices, micro_batches: as for `least_traffic`.
        last: the step `Pipeline.traffic` measured last, or None.

    Returns:
        A title line, a table (`from -> to`, `activations`, `gradients`, and with `last`
        `measured`: all bytes of every kind it sent between the pair) and a closing line.
    """
    outputs = [] if stages[0].inputs is None else keras.tree.flatten(read_graph(model).outputs)
    least = least_traffic(stages, replica_devices, outputs, micro_batches,
                          None if last is None else last.batch)
    measured = {} if last is None else {p: sum(row.values()) for p, row in last.pairs.items()}
    pairs = sorted(set(least) | set(measured))
    if not pairs:
        return ["No activations or gradients cross between devices (the stages share one); "
                "Pipeline.traffic(x, y) measures a step."]
    per = "per sample" if last is None else f"per step of {last.batch} samples"
    header = ["from -> to", "activations", "gradients"] + ([] if last is None else ["measured"])
    zero: dict[str, float | None] = {"activations": 0.0, "gradients": 0.0}
    rows = [[f"{a} -> {b}", *(_cell(least.get((a, b), zero)[k]) for k in header[1:3]),
             *([] if last is None else [_cell(measured.get((a, b), 0))])] for a, b in pairs]
    replicas = len(replica_devices)
    weights = sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size
                  for v in model.trainable_variables)
    more = (f"Replicas add {format_bytes(2 * (replicas - 1) * weights)} a step: each other "
            "copy reads the weights and returns their gradients. " if replicas > 1 else "")
    end = ("measured: all that the last Pipeline.traffic(x, y) step sent, data and scalars too."
           if last is not None else "Plus the data (inputs from the host, labels to the last "
           "stage); Pipeline.traffic(x, y) measures a step.")
    return [f"Least bytes between devices {per} (activations forward, their gradients back):",
            *text_table([header, *rows], numeric={1, 2, 3}), more + end]


def _cell(nbytes: float | None) -> str:
    return "?" if nbytes is None else format_bytes(nbytes) if nbytes else "0"
