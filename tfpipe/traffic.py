"""Bytes a traced step moves between devices, read from TensorFlow's placed, partitioned graphs.

Design: a tensor's requested device says little, since the placer decides for every op made
without one (it used to put Keras's weight-decay and clipping math on the default device).
What the runtime really moves is the `_Send` nodes of the partition graphs it runs: one per
tensor and pair of devices. TensorFlow reports those graphs (RunMetadata) when a function is
first instantiated with run metadata on, so `placed_transfers` traces a fresh function,
runs it once so, and sizes each sent tensor by the static shape of the op that made it in
the traced graph (ops of a lowered `tf.cond` branch are found in that branch's graph).
Each transfer also names the ops that read it on the receiving device (through the matching
`_Recv`): a gradient sum sent to another replica is made by a backward but read by the
replica reduction, and only its reader says so. Reading RunMetadata needs TensorFlow's
private eager context: the one touchpoint is here.

What this cannot see: the partition graphs of functions called inside the step (a stage
function that is not inlined) are not in its RunMetadata, so a variable such a function
reads across devices is not counted (which is why a replica reads its weights in the step
itself, `tfpipe.executor.weights`); nor are a collective's messages, which travel outside
the graphs.

The least a step must move, known from the cuts without running one, is
`tfpipe.cut_traffic`'s.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tensorflow as tf
from tensorflow.python.eager import context

from tfpipe.devices import canonical
from tfpipe.report import format_bytes, text_table


@dataclass(frozen=True)
class Transfer:
    """One tensor sent from one device to another in a step.

    Attributes:
        source: the sending device (canonical, e.g. `/device:CPU:1`).
        target: the receiving device.
        tensor: the sent tensor's name in the traced graph (`op:slot`).
        nbytes: its size by its static shape, or None where that is unknown.
        readers: the names of the ops that read it on the receiving device.
    """

    source: str
    target: str
    tensor: str
    nbytes: int | None
    readers: tuple[str, ...] = ()


def placed_transfers(fn: Any, *args: Any) -> list[Transfer]:
    """Every tensor `fn(*args)` sends between devices, as placed and partitioned by TensorFlow.

    Args:
        fn: a `tf.function` that has never run (RunMetadata carries the partition graphs
            only when a function is first instantiated).
        *args: its arguments; tensors with full shapes, so that sizes are known.

    Returns:
        The transfers of one call, one per `_Send` of its partition graphs.
    """
    ops = _ops_by_name(fn.get_concrete_function(*args).graph, "")
    context.enable_run_metadata()
    try:
        context.export_run_metadata()  # drops what an earlier reader left behind
        fn(*args)
        metadata = context.export_run_metadata()
    finally:
        context.disable_run_metadata()
    found = []
    for graph in metadata.function_graphs:
        readers = _readers(graph.partition_graphs)
        for partition in graph.partition_graphs:
            for node in partition.node:
                if node.op == "_Send":
                    key = (node.attr["tensor_name"].s, node.attr["recv_device"].s)
                    found.append(_transfer(node, ops, readers.get(key, ())))
    return found


Reads = tuple[tuple[str, int], ...]
"""The nodes that read a received tensor: `(name, index among their data inputs)`."""


def _readers(partitions: Any) -> dict[tuple[bytes, bytes], Reads]:
    """For each `_Recv` of `partitions`, by its rendezvous key (the tensor's name and the
    receiving device, as its `_Send` has them), the nodes that read it."""
    reads: dict[str, list[tuple[str, int]]] = {}
    for partition in partitions:
        for node in partition.node:
            data = [name for name in node.input if not name.startswith("^")]
            for index, name in enumerate(data):
                reads.setdefault(name.partition(":")[0], []).append((node.name, index))
    return {
        (node.attr["tensor_name"].s, node.attr["recv_device"].s): tuple(reads.get(node.name, ()))
        for partition in partitions for node in partition.node if node.op == "_Recv"
    }


def _transfer(node: Any, ops: dict[str, tf.Operation], readers: Reads) -> Transfer:
    name, _, slot = node.input[0].partition(":")
    sent = _sent_tensor(name, int(slot or 0), readers, ops)
    nbytes = 0 if re.search(r"/ctrl/_\d+$", name) else None  # a control edge's empty token
    if sent is not None:
        n = sent.shape.num_elements() if sent.shape.rank is not None else None
        nbytes = None if n is None or sent.dtype == tf.resource else n * sent.dtype.size
    return Transfer(canonical(node.attr["send_device"].s.decode()),
                    canonical(node.attr["recv_device"].s.decode()), f"{name}:{slot or 0}", nbytes,
                    tuple(reader for reader, _ in readers))


def _sent_tensor(name: str, slot: int, readers: Reads, ops: dict[str, tf.Operation]) -> Any:
    """The traced tensor a `_Send` of output `slot` of node `name` carries: its reader's input,
    where the reader kept its traced name and that input comes from the same op (the runtime
    prunes a function call's unused outputs, which renumbers its slots), else that output of
    the traced op (None when neither is found)."""
    for reader, index in readers:
        op = ops.get(_traced(reader))
        if op is not None and index < len(op.inputs):
            t = op.inputs[index]
            if name == t.op.name or name.endswith("/" + t.op.name):
                return t
    made = ops.get(_traced(name))
    return made.outputs[slot] if made is not None and slot < len(made.outputs) else None


def _traced(name: str) -> str:
    """A runtime node name as `_ops_by_name` keys it (a lowered branch's `/then/_<n>/` part)."""
    return re.sub(r"/(then|else)/_\d+/", r"/\1/", name)


def _ops_by_name(graph: tf.Graph, prefix: str) -> dict[str, tf.Operation]:
    """`{op name: op}` of `graph` and of the branches of its `tf.cond`s (named as the runtime
    names them once lowered: `<cond>/then/<op>`)."""
    found: dict[str, tf.Operation] = {}
    for op in graph.get_operations():
        found[prefix + op.name] = op
        for branch, attr in (("then", "_true_graph"), ("else", "_false_graph")):
            inner = getattr(op, attr, None)
            if inner is not None:
                found.update(_ops_by_name(inner, f"{prefix}{op.name}/{branch}/"))
    return found


KINDS = ("inputs", "labels", "sample_weights", "activations", "gradients", "weights",
         "weight_grads", "scalars", "other")


def kind_of(transfer: Transfer) -> str:
    """What a pipelined step's transfer carries, read from the name scopes the executor gives
    its ops: a split of the batch (`inputs/`, `labels/`, `sample_weights/`), a forward's
    output (`stage<k>_F<m>/`: activations), a backward's (`stage<k>_B<m>/` or `_I<m>/`: input
    gradients; also an op the tape names `gradient_tape/<forward op>`, such as the gradient
    of a loss made before the last stage, which softmax cross-entropy computes in its
    forward), a replica's one read of a stage's weights (`replica<r>_stage<k>_weights/`:
    weights), a replica's weight-gradient sum read by the replica reduction (`stage<k>_reduce/`
    among its readers: weight_grads); anything of at most 8 bytes is a scalar; the rest is
    "other"."""
    name = transfer.tensor.split("/")
    if transfer.nbytes is not None and transfer.nbytes <= 8:
        return "scalars"
    if any(re.match(r"stage\d+_reduce/", r) for r in transfer.readers):
        return "weight_grads"
    for part in name[:-1]:
        if re.fullmatch(r"replica\d+_stage\d+_weights", part):
            return "weights"
        if part in ("inputs", "labels", "sample_weights"):
            return part
        if part == "gradient_tape":
            return "gradients"
        found = re.fullmatch(r"(?:replica\d+_)?stage\d+_([FBIW])\d+", part)
        if found:
            return "activations" if found.group(1) == "F" else "gradients"
    return "other"


Pair = tuple[str, str]
"""A (sending device, receiving device) pair."""


def by_pair(transfers: list[Transfer]) -> dict[Pair, dict[str, int]]:
    """Bytes per pair of devices and kind (`KINDS`); pairs that sent only control tokens left
    out."""
    pairs: dict[Pair, dict[str, int]] = {}
    for t in transfers:
        row = pairs.setdefault((t.source, t.target), dict.fromkeys(KINDS, 0))
        row[kind_of(t)] += t.nbytes or 0
    return {pair: row for pair, row in pairs.items() if any(row.values())}


def traffic_table(transfers: list[Transfer]) -> str:
    """Bytes per step between each pair of devices, by kind, as a text table.

    Example:
        ```
        from -> to                       inputs  activations  scalars
        ------------------------------  -------  -----------  -------
        /device:CPU:0 -> /device:CPU:1  8.0 KiB      8.0 KiB     12 B
        ```
    """
    return kinds_table(by_pair(transfers))


def kinds_table(pairs: dict[Pair, dict[str, int]]) -> str:
    """`by_pair`'s figures as `traffic_table`'s text: a column per kind that any pair sent."""
    kinds = [k for k in KINDS if any(row[k] for row in pairs.values())]
    rows = [[f"{a} -> {b}", *(format_bytes(row[k]) if row[k] else "0" for k in kinds)]
            for (a, b), row in sorted(pairs.items())]
    header = ["from -> to", *kinds]
    return "\n".join(text_table([header, *rows], numeric=set(range(1, len(header)))))


LOOPS_UNROLLED = (
    "(The unrolled step of these stages and schedule: this pipeline runs its step as in-graph "
    "loops, whose sends the placed graphs hold once per loop, not once per iteration. Over "
    "loopback between workers the steady loop moved 3.05 MiB a step where the unrolled step "
    "moved 3.03 MiB, benchmarks/traffic.py.)")
"""What `Pipeline.traffic` says under the table of a pipeline that runs a loop."""


@dataclass(frozen=True)
class StepTraffic:
    """What one measured training step sent between devices.

    Attributes:
        batch: the step's batch size B.
        pairs: bytes per (source, target) pair of devices and kind (`by_pair`).
    """

    batch: int
    pairs: dict[Pair, dict[str, int]]

    def table(self) -> str:
        """The step's `traffic_table`."""
        return kinds_table(self.pairs)


def step_traffic(train_step: Callable[[Any], Any], model: Any, x: Any, y: Any) -> StepTraffic:
    """The bytes one training step on `(x, y)` sends between devices, as TensorFlow placed it.

    The step runs once (placement is only known once a function runs), in a fresh function;
    then every variable it changed (the model's, its optimizer's, its metrics') is set back,
    so the report trains nothing.

    Args:
        train_step: the pipelined step, called as `train_step((x, y))` while it is lent to
            the model.
        model: the user's compiled model.
        x, y: one batch (arrays or tensors, or dicts or lists of them).
    """
    variables = [*model.variables, *model.optimizer.variables, *model.metrics_variables]
    saved = [v.numpy() for v in variables]
    step = tf.function(lambda a, b: train_step((a, b)), autograph=False)
    try:
        tensors = tf.nest.map_structure(tf.convert_to_tensor, (x, y))  # dicts, lists too
        sent = placed_transfers(step, *tensors)
        return StepTraffic(int(tf.nest.flatten(tensors[0])[0].shape[0]), by_pair(sent))
    finally:
        for v, value in zip(variables, saved):
            v.assign(value)
