"""A pure pass: a schedule's steady phase, the stretch every rank repeats one micro-batch on.

Design:
- Why: the unrolled step traces every action, so its graph (and the time TensorFlow takes
  to optimise it before the first run) grows with M x K (docs/benchmarks.md, "Trace
  cost"). In a 1F1B step, though, after its warm-up every rank repeats the same few actions,
  each on the next micro-batch. `steady_phase` finds that stretch, so the executor
  (`tfpipe.executor.steadyloop`) traces it once, as the body of one in-graph loop over all
  ranks, and runs the warm-up before it and the cool-down after it as more iterations of
  the same body with some actions missing (`Steady.edges_as_iterations`): the graph then
  grows with K, not with M.
- A rank's row is periodic from position a with period p when each action p places later is
  the same `(stage, kind)` on the next micro-batch. p is the rank's actions per micro-batch.
  Each rank's longest periodic stretch is its steady phase; all ranks loop the same number
  of times (the fewest any rank has), each from the start of its stretch; the rest of a
  longer stretch belongs to the cool-down.
- The loop runs iteration i of every rank's body on micro-batch `template + i`. A value a
  body action makes in iteration i is read in iteration `i + delay` (`Steady.delay`), so the
  loop carries the last `delay` values of each such stream; values the warm-up made enter
  as the first ones. `steady_phase` checks that every dependency allows that: no
  action before the loop needs one inside it, and no body action needs one from a later
  iteration or from after the loop. Otherwise (GPipe: all forwards, then all backwards; a
  split backward's I/W) there is no steady phase and the executor unrolls the step.
- Nothing here imports TensorFlow: literal-table tests in tests/test_steady_phase.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tfpipe.schedules import Action, Schedule, dependencies

Branch = tuple[int, str]
"""`(stage, kind)`: what an action runs, whatever its micro-batch."""


@dataclass(frozen=True)
class Steady:
    """A schedule cut into what runs before the loop, its body, and what runs after it.

    Attributes:
        before: per rank, the actions before its loop (row order).
        body: per rank, its loop body's actions as iteration 0 runs them (row order).
        count: how many times the loop runs.
        after: per rank, the actions after its loop (row order).
        template: each body branch's micro-batch in iteration 0.
        num_micro_batches: M.

    Example:
        >>> from tfpipe.schedules import one_f_one_b
        >>> st = steady_phase(one_f_one_b(2, 4), [(0, 1)])
        >>> [[a.text(True) for a in row] for row in st.body], st.count
        ([['0F1', '0B0'], ['1F0', '1B0']], 3)
        >>> st.delay((0, "F"), (1, "F")), st.delay((0, "F"), (0, "B"))
        (1, 1)
    """

    before: list[list[Action]]
    body: list[list[Action]]
    count: int
    after: list[list[Action]]
    template: dict[Branch, int]
    num_micro_batches: int

    def delay(self, producer: Branch, consumer: Branch) -> int:
        """Iterations from a body action making a value to the body action reading it."""
        return self.template[producer] - self.template[consumer]

    def iterations(self, first: int, last: int) -> list[list[Action]]:
        """Per rank, the body's actions in iterations `first` to `last - 1` (negative: before
        the loop) on micro-batches that exist (0 to M - 1), in row order."""
        m = self.num_micro_batches
        return [[_shifted(a, i) for i in range(first, last) for a in row
                 if 0 <= a.micro_batch + i < m] for row in self.body]

    def edges_as_iterations(self) -> tuple[int, int] | None:
        """`(lead, tail)` when the actions before and after the loop are the body's in `lead`
        more iterations before it and `tail` after it, each action kept only where its
        micro-batch exists (1F1B: K - 1 each, the warm-up's forwards and the cool-down's
        backwards), else None. The executor runs them as masked iterations of the same
        body (`tfpipe.executor.steadyloop`), so nothing is traced action by action."""
        lead = max(self.template.values())
        tail = self.num_micro_batches - min(self.template.values()) - self.count
        if self.iterations(-lead, 0) != self.before:
            return None
        if self.iterations(self.count, self.count + tail) != self.after:
            return None
        return lead, tail


def _shifted(a: Action, by: int) -> Action:
    return Action(a.stage, a.kind, a.micro_batch + by)


def _stretch(row: Sequence[Action], period: int) -> tuple[int, int]:
    """`(start, periods)` of the row's longest periodic stretch (`periods` 0 for none)."""
    best, start, run = (0, 0), 0, 0
    for k in range(len(row) - period):
        run = run + 1 if row[k + period] == _shifted(row[k], 1) else 0
        if run == 1:
            start = k
        periods = (run + period) // period
        if run and periods > best[1]:
            best = (start, periods)
    return best


def _needs(a: Action, schedule: Schedule, edges: Sequence[tuple[int, int]]) -> list[Action]:
    """What `a` reads: the schedule's dependencies and, for the model's other edges (skip
    connections), the producer's forward (for F) or the consumer's backward (for B)."""
    deps = list(dependencies(a, schedule))
    m = a.micro_batch
    if a.kind == "F":
        deps += [Action(p, "F", m) for p, c in edges if c == a.stage]
    elif a.kind == "B":
        deps += [Action(c, "B", m) for p, c in edges if p == a.stage]
    return deps


def steady_phase(schedule: Schedule, edges: Sequence[tuple[int, int]]) -> Steady | None:
    """The schedule's steady phase (`Steady`), or None when it has none worth a loop.

    Args:
        schedule: a validated schedule of F and B actions.
        edges: `(producer stage, consumer stage)` of every tensor passed between stages.

    Returns:
        The cut, or None: a split backward, a rank with no periodic stretch of at least two
        periods, a dependency the loop cannot carry, or actions before or after the loop
        that are not the body's iterations with some actions missing
        (`Steady.edges_as_iterations`).
    """
    m = schedule.num_micro_batches
    if any(a.kind not in "FB" for row in schedule.ranks for a in row):
        return None
    stretches = []
    for row in schedule.ranks:
        if not row or len(row) % m:
            return None
        period = len(row) // m
        start, periods = _stretch(row, period)
        if len({(a.stage, a.kind) for a in row[start: start + period]}) != period:
            return None
        stretches.append((start, period, periods))
    count = min(periods for _, _, periods in stretches)
    if count < 2:
        return None
    before, body, after = [], [], []
    for row, (start, period, _) in zip(schedule.ranks, stretches):
        before.append(list(row[:start]))
        body.append(list(row[start: start + period]))
        after.append(list(row[start + count * period:]))
    template = {(a.stage, a.kind): a.micro_batch for row in body for a in row}
    steady = Steady(before, body, count, after, template, m)
    if not _carried(steady, schedule, edges) or steady.edges_as_iterations() is None:
        return None
    return steady


def _carried(steady: Steady, schedule: Schedule, edges: Sequence[tuple[int, int]]) -> bool:
    """Whether every action's inputs exist when the cut runs it (see the module docstring)."""
    earlier = {a for row in steady.before for a in row}
    if any(d not in earlier for a in earlier for d in _needs(a, schedule, edges)):
        return False
    for row in steady.body:
        for a in row:
            for d in _needs(a, schedule, edges):
                delay = steady.template.get((d.stage, d.kind), -1) - a.micro_batch
                if delay < 0:
                    return False
                # iterations 0 .. delay-1 read values made before the loop
                if any(_shifted(d, i) not in earlier for i in range(delay)):
                    return False
    return True
