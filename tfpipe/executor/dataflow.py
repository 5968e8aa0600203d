"""The trace-time dataflow of one step: values, gradients and tapes passed between actions.

Design: while a step is traced, each action hands symbolic tensors to later actions: a
stage's outputs to the stages that consume them (`publish` / `inputs_for`), input gradients
back to the stages that made those inputs (`send_grad` / `take_grad`, summed over consumers),
a forward's tape to its backward (`keep_forward` / `take_forward`), and every action's
results to the actions that must wait for it (`mark_done` / `done`). Values and gradients
are keyed by (micro-batch, id of a KerasTensor of the user's graph); tapes by (stage,
micro-batch). The schedule's trace order (`tfpipe.executor.program`) guarantees every key is
written before it is read.

A tensor read by stages on several devices (a skip connection) gets one gradient from each:
those from one device are summed there, and the per-device sums are added on the device of
the stage that made it, where `take_grad` runs. So each consumer device sends one gradient
straight back, as its activation came straight to it. (Summing as they arrived, under the
next consumer's device, sent one consumer's gradient through another's device first.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from tfpipe.executor.microbatch import MicroBatches
from tfpipe.schedules import Action

Key = tuple[int, int]


@dataclass
class Recorded:
    """What a stage's forward on one micro-batch left for its backward.

    With recomputation `tape` is None and `replay` holds the stage inputs, their ids and the
    stage's non-trainable state before the forward, for the backward's replay.

    `weights` is a replica's read of the stage's trainable variables that the forward used in
    their place (`tfpipe.executor.weights`), or None when it read the variables: the backward
    takes its weight gradients for whichever it used (`params`).

    `targets` are the stage's float outputs that other stages consume (ids in `target_ids`)
    followed by its loss terms.
    """

    tape: tf.GradientTape | None
    watched: list[tf.Tensor]
    watched_ids: list[int]
    targets: list[tf.Tensor]
    target_ids: list[int]
    replay: tuple[list[Any], list[Any], list[tf.Tensor]] | None = None
    weights: list[tf.Tensor] | None = None

    def params(self, variables: list[Any]) -> list[Any]:
        """What the weight gradients are taken for: `weights`, else the stage's `variables`."""
        return variables if self.weights is None else list(self.weights)


@dataclass
class Dataflow:
    """The values, gradients and tapes that the actions of one traced step pass on.

    Args:
        mb: the step's micro-batches.

    Attributes:
        losses: the weighted loss terms of every forward so far (they add up to the batch loss).
    """

    mb: MicroBatches
    losses: list[tf.Tensor] = field(default_factory=list)
    _values: dict[Key, Any] = field(default_factory=dict)
    _grads: dict[Key, dict[str, Any]] = field(default_factory=dict)
    _forwards: dict[Key, Recorded] = field(default_factory=dict)
    _done: dict[Action, list[tf.Tensor]] = field(default_factory=dict)

    def publish(self, m: int, ids: list[int], values: list[Any]) -> None:
        """Makes the values of the graph tensors `ids` for micro-batch m available."""
        for i, v in zip(ids, values):
            self._values[(m, i)] = v

    def inputs_for(self, m: int, ids: list[int]) -> list[Any]:
        """The published values of the graph tensors `ids` for micro-batch m."""
        return [self._values[(m, i)] for i in ids]

    def send_grad(self, m: int, i: int, grad: Any) -> None:
        """Sends a consumer's gradient for tensor `i` of micro-batch m back to its maker; one
        from the same device as an earlier one is added to it there (the caller's device)."""
        grad = tf.convert_to_tensor(grad)
        sums = self._grads.setdefault((m, i), {})
        prev = sums.get(grad.device)
        sums[grad.device] = grad if prev is None else prev + grad

    def take_grad(self, m: int, i: int) -> Any:
        """The summed gradient sent for tensor `i` of micro-batch m (None if none was sent),
        the per-device sums added on the caller's device (the maker's)."""
        sums = list(self._grads.pop((m, i), {}).values())
        return None if not sums else sums[0] if len(sums) == 1 else tf.add_n(sums)

    def keep_forward(self, action: Action, rec: Recorded) -> None:
        """Keeps what the forward `action` recorded, for its stage's backward."""
        self._forwards[(action.stage, action.micro_batch)] = rec

    def take_forward(self, action: Action) -> Recorded:
        """What the forward of `action`'s stage and micro-batch recorded (taken once)."""
        return self._forwards.pop((action.stage, action.micro_batch))

    def mark_done(self, action: Action, tensors: list[tf.Tensor]) -> None:
        """Records the tensors whose running means `action` ran."""
        self._done[action] = tensors

    def done(self, action: Action | None) -> list[tf.Tensor]:
        """The tensors of `action` (none for None or an action not traced yet)."""
        return list(self._done.get(action, [])) if action is not None else []

    def all_done(self) -> list[tf.Tensor]:
        """The tensors of every action traced so far."""
        return [t for ts in self._done.values() for t in ts]
