"""Where a rank loop keeps each in-flight micro-batch's residuals until its backward reads them.

Design: a stage's forward returns the residuals its backward reads (`stagepair.StagePair`);
between the two they wait in one of two stores, one interface (`initial`, `write`, `read`,
given the action's `RankRows` places):
- `RingStore` (a ring of at most `MAX_SLOTS`): a micro-batch's residuals packed into one
  value (an `Optional`, as TensorFlow's own `cond` gradient packs intermediates), the
  stage's latest `depth` forwards' values in as many loop variables. A forward puts its
  value first and shifts the others along (no operation: the loop variables are renamed);
  a backward picks its micro-batch's by age (`RankRows.ages`) with a `switch_case`. A
  forward and a backward run a handful of operations however many residuals the stage has
  (the 12-block Transformer keeps about 180 per stage at K = 4; a TensorList write and
  read of each were half of the loops' extra cost per step, docs/benchmarks.md). Not a
  TensorList of `Optional`s: TensorFlow has no GPU kernel for one (`TensorListSetItem`/
  `GetItem` take number types), while variant values pass through GPU control flow as
  TensorLists do.
- `ListStore` (more in flight, as GPipe with many micro-batches): one TensorList per
  residual dtype, a micro-batch's residuals in its slot (`RankRows.slots`): slot w's
  residual j of a group of g at index w * g + j; a write and a read per residual, but no
  loop variable per slot.
Nothing is cleared: the next forward overwrites (the ring drops its oldest value, a slot
is reused), so a stage holds its most in-flight micro-batches' residuals (1F1B: K - s).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from tfpipe.executor.stagepair import StagePair, get, set_item

__all__ = ["MAX_SLOTS", "ListStore", "RingStore", "store_for", "unpacked"]

MAX_SLOTS = 8
"""The longest ring a stage keeps as loop variables (`RingStore`); past it, `ListStore`."""


class RingStore:
    """A stage's residuals, one `Optional` per micro-batch, its latest `depth` in a ring of
    loop variables.

    Args:
        pair: the stage's `StagePair` (`residuals`: the forward outputs to keep).
        depth: the ring's length (`RankRows.depth`).
    """

    def __init__(self, pair: StagePair, depth: int) -> None:
        self.pair, self.depth = pair, depth

    def initial(self) -> list[tf.Tensor]:
        """The loop state's entries for this stage (an empty ring), on the caller's device."""
        if not self.pair.residuals:
            return []
        return [tf.raw_ops.OptionalNone() for _ in range(self.depth)]

    def write(self, state: list[Any], at: Any, outs: list[Any]) -> list[Any]:
        """The ring with the micro-batch's residuals (`outs`: the forward's outputs) first and
        the oldest dropped."""
        if not state:
            return state
        packed = tf.raw_ops.OptionalFromValue(components=[outs[n] for n in self.pair.residuals])
        return [packed, *state[:-1]]

    def read(self, state: list[Any], at: Any) -> dict[int, tf.Tensor]:
        """The residuals of the micro-batch of age `at.age`, by their index among the
        forward's outputs."""
        if not state:
            return {}
        packed = state[0] if self.depth == 1 else tf.switch_case(
            at.age, [lambda j=j: state[j] for j in range(self.depth)])
        return unpacked(self.pair, packed)


def unpacked(pair: StagePair, packed: tf.Tensor) -> dict[int, tf.Tensor]:
    """A micro-batch's residuals from their `Optional`, by their index among the stage's
    forward outputs."""
    specs = [pair.specs[n] for n in pair.residuals]
    values = tf.raw_ops.OptionalGetValue(
        optional=packed, output_types=[s.dtype for s in specs],
        output_shapes=[s.shape for s in specs])
    for value, spec in zip(values, specs):
        value.set_shape(spec.shape)
    return dict(zip(pair.residuals, values))


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

    def write(self, state: list[Any], at: Any, outs: list[Any]) -> list[Any]:
        """The state with the micro-batch's residuals (`outs`: the forward's outputs) in
        its slot (`at.slot`)."""
        written = []
        for lst, group in zip(state, self.pair.res_groups):
            for place, n in zip(places(at.slot, len(group)), group):
                lst = set_item(lst, place, outs[n])
            written.append(lst)
        return written

    def read(self, state: list[Any], at: Any) -> dict[int, tf.Tensor]:
        """The residuals in the micro-batch's slot (`at.slot`), by their index among the
        forward's outputs."""
        any_shape = tf.constant(-1)
        return {n: get(lst, place, self.pair.specs[n], any_shape)
                for lst, group in zip(state, self.pair.res_groups)
                for place, n in zip(places(at.slot, len(group)), group)}


def store_for(pair: StagePair, depth: int, width: int) -> RingStore | ListStore:
    """The store for a stage whose residuals need a ring of `depth` or `width` slots."""
    return RingStore(pair, depth) if depth <= MAX_SLOTS else ListStore(pair, width)


def places(slot: tf.Tensor, n: int) -> list[tf.Tensor]:
    """The TensorList indices of a slot's n residuals of one group (`slot * n + j`), made by
    three operations, not three per residual (tracing them took seconds)."""
    return list(tf.unstack(slot * n + tf.range(n), num=n))
