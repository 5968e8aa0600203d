"""Pure passes over a schedule's actions: trace order, per-rank waits and replica shifting.

Design:
- One source of truth: the executor never hard-codes an order. It traces the schedule's
  actions in the order of `schedules.clock` (`trace_order`), so every input an action needs
  exists when it is traced, and the dataflow graph is exactly the schedule's dependency graph.
- Keeping the schedule's promises with few dependencies: dataflow alone already orders
  actions that consume each other's results. What it does not do is hold back a forward
  until the backward that the schedule put before it on the same rank has run, and that is
  what bounds in-flight activations (1F1B: stage s starts F(m+K-s) only after B(m)). So each
  `F` gets one control dependency (`rank_waits`): on the latest backward-type action (`B`,
  `I` or `W`) before it on its rank, if any. GPipe gets none, 1F1B gets exactly the warm-up
  bound. Likewise each action that adds weight gradients (`B`, `I`) waits for the one
  before it on its rank (`gradient_waits`), which bounds gradient memory to the running sum
  and one micro-batch's gradients, whatever the schedule.
- Replicas: with `replicas=R` the executor runs R copies of the schedule; copy r names the
  micro-batches `r*M .. r*M+M-1` of the batch (`shift`), so every action of every copy is a
  distinct `Action` and one dict keyed by actions serves all copies.
- Nothing here imports TensorFlow or Keras: these are functions over `tfpipe.schedules` data,
  tested with literal tables (tests/test_executor_program.py), and the executor only walks
  their result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tfpipe.schedules import Action, Schedule, clock

Run = tuple[int, Action]
"""`(replica, action)`: one action as one replica runs it (micro-batch already shifted)."""


def trace_order(schedule: Schedule) -> list[Action]:
    """The schedule's actions in the order the executor traces them: `clock` order.

    Example:
        >>> from tfpipe.schedules import gpipe
        >>> [a.text(with_stage=True) for a in trace_order(gpipe(2, 1))]
        ['0F0', '1F0', '1B0', '0B0']
    """
    return [a for _, a in clock(schedule)]


def rank_waits(schedule: Schedule, kinds: str = "F") -> dict[Action, Action]:
    """For each action of `kinds`, the latest backward-type action (`B`, `I`, `W`) before it on
    its rank, if any.

    With `kinds="F"`: the one dependency that bounds in-flight activations. With
    `kinds="BI"`: used only for recomputed stages, where a replay holds a micro-batch's
    activations, so replays on one rank run one after another, in the schedule's order.

    Args:
        schedule: the schedule.
        kinds: the action kinds that get a wait.

    Returns:
        `{action: the action it waits on}`; actions without a wait are absent.
    """
    waits: dict[Action, Action] = {}
    for actions in schedule.ranks:
        latest = None
        for a in actions:
            if a.kind in kinds and latest is not None:
                waits[a] = latest
            if a.kind != "F":
                latest = a
    return waits


def gradient_waits(schedule: Schedule) -> dict[Action, Action]:
    """For each action that adds weight gradients (`B`, and `I`, which takes a split backward's
    weight gradients: `tfpipe.executor.step`), the one before it on its rank.

    Chained so, a rank's weight-gradient sums grow one micro-batch at a time: without it the
    dataflow runtime may compute every micro-batch's gradients before adding any (GPipe, and
    1F1B's last backwards, have no other order among them), holding M gradient-sized
    tensors at once: 6x the weights at M = 4 with SGD, where the chain holds the sum and one
    micro-batch's gradients (measured with allocator statistics, `tests/test_memory_order.py`).
    """
    waits: dict[Action, Action] = {}
    for actions in schedule.ranks:
        latest = None
        for a in actions:
            if a.kind in "BI":
                if latest is not None:
                    waits[a] = latest
                latest = a
    return waits


def shift(action: Action, replica: int, micro_batches: int) -> Action:
    """`action` as replica `replica` runs it: on micro-batch `replica * M + m`."""
    return Action(action.stage, action.kind, action.micro_batch + replica * micro_batches)


def replica_runs(order: list[Action], replicas: int, micro_batches: int) -> list[Run]:
    """`(replica, action)` in program order: each action of `order` for every replica in turn."""
    return [(r, shift(a, r, micro_batches)) for a in order for r in range(replicas)]


def replicate_waits(
    waits: dict[Action, Action], replicas: int, micro_batches: int
) -> dict[Action, Action]:
    """Per-rank waits of the schedule, for every replica's own actions."""
    return {
        shift(a, r, micro_batches): shift(w, r, micro_batches)
        for a, w in waits.items()
        for r in range(replicas)
    }


def scope_name(replica: int, action: Action, replicas: int) -> str:
    """The name scope of an action's ops: `stage1_B2`, or `replica1_stage1_B2` with replicas."""
    name = f"stage{action.stage}_{action.kind}{action.micro_batch}"
    return name if replicas == 1 else f"replica{replica}_{name}"


def global_rank(schedule: Schedule, replica: int, action: Action) -> int:
    """The row of `action` in a measured timeline: replica r's ranks follow replica r-1's."""
    return replica * schedule.num_ranks + schedule.rank_of(action.stage)


@dataclass(frozen=True)
class Program:
    """What the executor walks for one schedule and replica count.

    Attributes:
        runs: every `(replica, action)` in trace order.
        forward_runs: the `F` runs only, in the same order (evaluation and prediction).
        waits: the one control dependency each forward gets (see `rank_waits`).
        replay_waits: the dependency each recomputed `B` / `I` replay gets.
        gradient_waits: the dependency each `B` / `I` gets (see `gradient_waits`).
    """

    runs: list[Run]
    forward_runs: list[Run]
    waits: dict[Action, Action]
    replay_waits: dict[Action, Action]
    gradient_waits: dict[Action, Action]

    @classmethod
    def build(cls, schedule: Schedule, replicas: int) -> Program:
        """The program of `schedule` run by `replicas` copies.

        Args:
            schedule: a validated schedule.
            replicas: how many data-parallel copies run it.
        """
        m = schedule.num_micro_batches
        runs = replica_runs(trace_order(schedule), replicas, m)
        return cls(
            runs=runs,
            forward_runs=[(r, a) for r, a in runs if a.kind == "F"],
            waits=replicate_waits(rank_waits(schedule), replicas, m),
            replay_waits=replicate_waits(rank_waits(schedule, kinds="BI"), replicas, m),
            gradient_waits=replicate_waits(gradient_waits(schedule), replicas, m),
        )


@dataclass(frozen=True)
class RankRows:
    """A schedule as the rank loops run it (`tfpipe.executor.rankloop`): per rank, the
    `(stage, kind)` of each branch of its loop body, and per action the branch, micro-batch
    and where its residuals wait.

    Two ways to say where (`tfpipe.executor.residuals` uses one per stage): a slot of the
    stage, the lowest free one from a micro-batch's forward until its backward frees it
    (the next forward into it overwrites it), so a stage holds at most `width[s]`
    micro-batches' residuals, its most in flight at once (1F1B: K - s; GPipe: M); or an age,
    the number of the stage's forwards run since the micro-batch's own, for a ring of the
    stage's `depth[s]` latest forwards (a forward's age is 0). When backwards run in their
    forwards' order, as in every schedule the loops run, depth equals width.

    Attributes:
        branches: `branches[r]`, the distinct `(stage, kind)` of rank r's actions, in order
            of first appearance.
        codes: `codes[r][n]`, the branch index of rank r's n-th action.
        micro_batches: `micro_batches[r][n]`, its micro-batch.
        slots: `slots[r][n]`, the residual slot its forward fills or its backward reads.
        width: `width[s]`, the slots stage s needs.
        ages: `ages[r][n]`, 0 for a forward, the age of its micro-batch for a backward.
        depth: `depth[s]`, the ring stage s needs (its largest age, plus one).

    Example:
        >>> from tfpipe.schedules import one_f_one_b
        >>> rows = RankRows.build(one_f_one_b(2, 3))
        >>> rows.branches[1], rows.codes[1]
        ([(1, 'F'), (1, 'B')], [0, 1, 0, 1, 0, 1])
        >>> rows.slots[0], rows.width
        ([0, 1, 0, 0, 1, 0], {0: 2, 1: 1})
        >>> rows.ages[0], rows.depth
        ([0, 0, 1, 0, 1, 0], {0: 2, 1: 1})
    """

    branches: list[list[tuple[int, str]]]
    codes: list[list[int]]
    micro_batches: list[list[int]]
    slots: list[list[int]]
    width: dict[int, int]
    ages: list[list[int]]
    depth: dict[int, int]

    @classmethod
    def build(cls, schedule: Schedule) -> RankRows:
        """The rows of `schedule` (validated: each backward after its forward)."""
        branches, codes, mbs, slots, ages = [], [], [], [], []
        width: dict[int, int] = {}
        depth: dict[int, int] = {}
        for actions in schedule.ranks:
            seen: dict[tuple[int, str], int] = {}
            for a in actions:
                seen.setdefault((a.stage, a.kind), len(seen))
            branches.append(list(seen))
            codes.append([seen[(a.stage, a.kind)] for a in actions])
            mbs.append([a.micro_batch for a in actions])
            slots.append(_slots(actions, width))
            ages.append(_ages(actions, depth))
        return cls(branches, codes, mbs, slots, dict(sorted(width.items())), ages,
                   dict(sorted(depth.items())))


def _slots(actions: Sequence[Action], width: dict[int, int]) -> list[int]:
    """Each action's residual slot (`RankRows.slots`); widens `width` as slots are taken."""
    held: dict[tuple[int, int], int] = {}  # (stage, micro-batch) -> its slot
    row = []
    for a in actions:
        if a.kind == "F":
            taken = {v for (s, _), v in held.items() if s == a.stage}
            slot = min(set(range(len(taken) + 1)) - taken)
            held[(a.stage, a.micro_batch)] = slot
            width[a.stage] = max(width.get(a.stage, 0), slot + 1)
        else:
            slot = held.pop((a.stage, a.micro_batch))
        row.append(slot)
    return row


def _ages(actions: Sequence[Action], depth: dict[int, int]) -> list[int]:
    """Each action's age (`RankRows.ages`); deepens `depth` to the largest age plus one."""
    runs: dict[int, int] = {}  # stage -> forwards run so far
    born: dict[tuple[int, int], int] = {}
    row = []
    for a in actions:
        age = 0
        if a.kind == "F":
            born[(a.stage, a.micro_batch)] = runs.get(a.stage, 0)
            runs[a.stage] = runs.get(a.stage, 0) + 1
        else:
            age = runs[a.stage] - 1 - born[(a.stage, a.micro_batch)]
        depth[a.stage] = max(depth.get(a.stage, 0), age + 1)
        row.append(age)
    return row


def loop_refusal(schedule: Schedule, edges: list[tuple[int, int]]) -> str | None:
    """Why the rank loops cannot run `schedule`, or None when they can.

    The loops pass activations and gradients through one first-in-first-out queue per
    `(producer stage, consumer stage)` edge, so each edge's receiver must read in the order
    its sender writes: the consumer's forwards in the producer's forward order, the
    producer's backwards in the consumer's backward order. Split backward (`I`/`W`) is not
    run by the loops yet.

    Args:
        schedule: a validated schedule.
        edges: `(producer stage, consumer stage)` of every tensor passed between stages.

    Example:
        >>> from tfpipe.schedules import gpipe
        >>> loop_refusal(gpipe(2, 3), [(0, 1)]) is None
        True
    """
    kinds = {a.kind for row in schedule.ranks for a in row}
    if kinds - set("FB"):
        return (f"the schedule splits backward into I and W ({schedule.name}); the rank loops "
                "run F and B only")
    order: dict[tuple[int, str], list[int]] = {}
    for row in schedule.ranks:
        for a in row:
            order.setdefault((a.stage, a.kind), []).append(a.micro_batch)
    for p, c in edges:
        if order[(p, "F")] != order[(c, "F")] or order[(c, "B")] != order[(p, "B")]:
            return (f"stages {p} and {c} of {schedule.name} do not run their micro-batches in "
                    "the same order, so one queue between them would deliver them out of order")
    return None
