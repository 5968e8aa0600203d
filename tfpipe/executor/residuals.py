"""Where a rank loop keeps each in-flight micro-batch's residuals until its backward reads them.

Design: a stage's forward returns the residuals its backward reads (`stagepair.StagePair`);
between the two, a micro-batch's residuals wait in one of the stage's slots
(`program.RankRows.slots`: at most `width` micro-batches are in flight on it; 1F1B: K - s).
Two stores, one interface (`initial`, `write`, `read`):
- `SlotStore` (width <= `MAX_SLOTS`): a micro-batch's residuals packed into one value (an
  `Optional`, as TensorFlow's own `cond` gradient packs intermediates), one loop variable per
  slot, the slot picked by a `switch_case`. A forward and a backward run a handful of
  operations however many residuals the stage has (the 12-block Transformer keeps about 180
  per stage at K = 4; a TensorList write and read of each were half of the loops' extra cost
  per step, docs/benchmarks.md). Not a TensorList of `Optional`s: TensorFlow has no GPU kernel
  for one (`TensorListSetItem`/`GetItem` take number types), while variant values pass
  through GPU control flow as TensorLists do.
- `ListStore` (more slots, as GPipe with many micro-batches): one TensorList per residual
  dtype, slot w's residual j of a group of g at index w * g + j; a write and a read per
  residual, but no loop variable per slot (a switch over M slots of M loop variables grows
  with M squared).
The next forward into a slot overwrites it, so nothing is cleared.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfpipe.executor.stagepair import StagePair, get, set_item

__all__ = ["MAX_SLOTS", "ListStore", "SlotStore", "store_for"]

MAX_SLOTS = 8
"""The most slots a stage keeps as loop variables (`SlotStore`); past it, `ListStore`."""


class SlotStore:
    """A stage's residuals, one `Optional` per slot, each slot a loop variable.

    Args:
        pair: the stage's `StagePair` (`residuals`: the forward outputs to keep).
        width: the slots the stage needs (`RankRows.width`).
    """

    def __init__(self, pair: StagePair, width: int) -> None:
        self.pair, self.width = pair, width

    def initial(self) -> list[tf.Tensor]:
        """The loop state's entries for this stage (empty slots), on the caller's device."""
        if not self.pair.residuals:
            return []
        return [tf.raw_ops.OptionalNone() for _ in range(self.width)]

    def write(self, state: list[Any], slot: tf.Tensor, outs: list[Any]) -> list[Any]:
        """The state with the micro-batch's residuals (`outs`: the forward's outputs) in
        `slot`."""
        if not state:
            return state
        packed = tf.raw_ops.OptionalFromValue(components=[outs[n] for n in self.pair.residuals])
        if self.width == 1:
            return [packed]
        branches = [lambda j=j: [packed if i == j else state[i] for i in range(self.width)]
                    for j in range(self.width)]
        return list(tf.switch_case(slot, branches))

    def read(self, state: list[Any], slot: tf.Tensor) -> dict[int, tf.Tensor]:
        """The residuals in `slot`, by their index among the forward's outputs."""
        if not state:
            return {}
        packed = state[0] if self.width == 1 else tf.switch_case(
            slot, [lambda j=j: state[j] for j in range(self.width)])
        specs = [self.pair.specs[n] for n in self.pair.residuals]
        values = tf.raw_ops.OptionalGetValue(
            optional=packed, output_types=[s.dtype for s in specs],
            output_shapes=[s.shape for s in specs])
        for value, spec in zip(values, specs):
            value.set_shape(spec.shape)
        return dict(zip(self.pair.residuals, values))


class ListStore:
    """A stage's residuals in one TensorList per dtype, `width` slots long.

    Args:
        pair: the stage's `StagePair` (`res_groups`: its residuals by dtype).
        width: the slots the stage needs (`RankRows.width`).
    """

    def __init__(self, pair: StagePair, width: int) -> None:
        self.pair, self.width = pair, width

    def initial(self) -> list[tf.Tensor]:
        """The loop state's entries for this stage (one list per dtype), on the caller's
        device."""
        return [tf.raw_ops.TensorListReserve(
            element_shape=tf.constant(-1), num_elements=self.width * len(group),
            element_dtype=self.pair.specs[group[0]].dtype) for group in self.pair.res_groups]

    def write(self, state: list[Any], slot: tf.Tensor, outs: list[Any]) -> list[Any]:
        """The state with the micro-batch's residuals (`outs`: the forward's outputs) in
        `slot`."""
        written = []
        for lst, group in zip(state, self.pair.res_groups):
            for place, n in zip(places(slot, len(group)), group):
                lst = set_item(lst, place, outs[n])
            written.append(lst)
        return written

    def read(self, state: list[Any], slot: tf.Tensor) -> dict[int, tf.Tensor]:
        """The residuals in `slot`, by their index among the forward's outputs."""
        any_shape = tf.constant(-1)
        return {n: get(lst, place, self.pair.specs[n], any_shape)
                for lst, group in zip(state, self.pair.res_groups)
                for place, n in zip(places(slot, len(group)), group)}


def store_for(pair: StagePair, width: int) -> SlotStore | ListStore:
    """The store for a stage that keeps up to `width` micro-batches' residuals."""
    return SlotStore(pair, width) if width <= MAX_SLOTS else ListStore(pair, width)


def places(slot: tf.Tensor, n: int) -> list[tf.Tensor]:
    """The TensorList indices of a slot's n residuals of one group (`slot * n + j`), made by
    three operations, not three per residual (tracing them took seconds)."""
    return list(tf.unstack(slot * n + tf.range(n), num=n))
