"""Actions and schedules as plain data: what each pipeline rank does, in order.

An `Action` is one unit of pipeline work: a stage, a kind and a micro-batch. Its short text
form is `F3` (forward of micro-batch 3), `B3` (backward), `I3` / `W3` (the two halves of a
split backward: gradient with respect to the stage input, and with respect to the weights).
When a rank holds several stages (interleaved schedules) the stage is written in front:
`2F3` is stage 2's forward of micro-batch 3.

A `Schedule` is one tuple of actions per rank (device). It carries no timing and no
TensorFlow: generators build it, `validate` checks it, `clock` orders it, and the executor
interprets it. This module deliberately imports nothing from TensorFlow or Keras.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

KINDS: tuple[str, ...] = ("F", "B", "I", "W")
_ACTION_RE = re.compile(r"^(?:(\d+))?([FBIW])(\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    """One unit of pipeline work.

    Args:
        stage: index of the model stage (0 = the stage that reads the model's inputs).
        kind: `"F"` forward, `"B"` full backward, `"I"` input-gradient half of a backward,
            `"W"` weight-gradient half of a backward.
        micro_batch: index of the micro-batch, `0 <= micro_batch < micro_batches`.

    Example:
        >>> str(Action(1, "F", 3))
        'F3'
        >>> Action.parse("F3", stage=1) == Action(1, "F", 3)
        True
    """

    stage: int
    kind: str
    micro_batch: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Unknown action kind {self.kind!r} in {self!r}: use one of {KINDS}.")
        if self.stage < 0 or self.micro_batch < 0:
            raise ValueError(f"Stage and micro-batch must be >= 0, got {self!r}.")

    def __str__(self) -> str:
        return f"{self.kind}{self.micro_batch}"

    def text(self, with_stage: bool = False) -> str:
        """Short text form: `F3`, or `2F3` with the stage in front."""
        return f"{self.stage}{self}" if with_stage else str(self)

    @classmethod
    def parse(cls, text: str, stage: int | None = None) -> Action:
        """Parses `F3` (stage given separately) or `2F3` (stage in the text).

        Raises:
            ValueError: if the text is not of that form or names no stage.
        """
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ValueError(
                f"Cannot parse action {text!r}: write it as KIND + micro-batch, for "
                f"example 'F3' or 'B0', or with a stage in front, '2F3'."
            )
        stage_text, kind, mb = match.groups()
        if stage_text is not None:
            stage = int(stage_text)
        if stage is None:
            raise ValueError(f"Action {text!r} names no stage: write it as '0{text}'.")
        return cls(stage, kind, int(mb))


def check_sizes(num_stages: int, num_micro_batches: int) -> None:
    """Raises a `ValueError` unless both sizes are positive integers (bools rejected)."""
    for label, value in (("num_stages", num_stages), ("num_micro_batches", num_micro_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}.")


@dataclass(frozen=True)
class Schedule:
    """What each rank (device) runs, in order.

    Args:
        name: a label, for example `"gpipe"`.
        num_stages: number of model stages K (or virtual stages for interleaved schedules).
        num_micro_batches: number of micro-batches M per training step.
        ranks: one tuple of `Action`s per rank, in execution order.

    Example:
        >>> s = Schedule.from_text(["F0 F1 B0 B1", "F0 F1 B0 B1"], name="gpipe")
        >>> s.ranks[1][0]
        Action(stage=1, kind='F', micro_batch=0)
    """

    name: str
    num_stages: int
    num_micro_batches: int
    ranks: tuple[tuple[Action, ...], ...]
    _rank_of: dict[int, int] = field(default_factory=dict, compare=False, repr=False)
    _split: set[int] = field(default_factory=set, compare=False, repr=False)
    _split_pairs: set[tuple[int, int]] = field(default_factory=set, compare=False, repr=False)

    def __post_init__(self) -> None:
        for r, actions in enumerate(self.ranks):
            for a in actions:
                if a.kind in ("I", "W"):
                    self._split.add(a.stage)
                    self._split_pairs.add((a.stage, a.micro_batch))
                owner = self._rank_of.setdefault(a.stage, r)
                if owner != r:
                    raise ValueError(
                        f"Schedule {self.name!r}: stage {a.stage} has actions on rank "
                        f"{owner} and rank {r} ({a.text(True)}); a stage lives on one rank."
                    )

    @property
    def num_ranks(self) -> int:
        """Number of ranks (devices) the schedule runs on."""
        return len(self.ranks)

    def rank_of(self, stage: int) -> int:
        """The rank that runs `stage`.

        Raises:
            KeyError: if no rank runs an action of `stage`.
        """
        try:
            return self._rank_of[stage]
        except KeyError:
            raise KeyError(
                f"Schedule {self.name!r} has no action for stage {stage}: it names stages "
                f"{sorted(self._rank_of)}."
            ) from None

    @property
    def has_split_backward(self) -> bool:
        """True when backward is split into `I` and `W` actions (zero-bubble schedules)."""
        return bool(self._split)

    def splits_backward(self, stage: int, micro_batch: int | None = None) -> bool:
        """True when `stage` runs the backward of `micro_batch` as `I` + `W` rather than one
        `B`; without `micro_batch`, when it splits any of its backwards (DualPipeV runs some of
        a stage's backwards whole and others split)."""
        if micro_batch is None:
            return stage in self._split
        return (stage, micro_batch) in self._split_pairs

    def to_text(self) -> list[str]:
        """One line per rank; the stage is written only where a rank holds several."""
        lines = []
        for r, actions in enumerate(self.ranks):
            multi = len({a.stage for a in actions}) > 1 or any(a.stage != r for a in actions)
            lines.append(" ".join(a.text(with_stage=multi) for a in actions))
        return lines

    @classmethod
    def from_text(
        cls,
        lines: list[str],
        name: str = "custom",
        num_stages: int | None = None,
        num_micro_batches: int | None = None,
    ) -> Schedule:
        """Builds a schedule from one line of actions per rank.

        In a line without stage prefixes, rank r's actions belong to stage r.

        Args:
            lines: for example `["F0 F1 B0 B1", "F0 F1 B0 B1"]`.
            name: a label for error messages.
            num_stages: defaults to one more than the largest stage named.
            num_micro_batches: defaults to one more than the largest micro-batch named.

        Returns:
            A `Schedule` (not yet validated: call `tfpipe.schedules.validate`).
        """
        ranks = tuple(
            tuple(Action.parse(tok, stage=r) for tok in line.split())
            for r, line in enumerate(lines)
        )
        all_actions = [a for r in ranks for a in r]
        if not all_actions:
            raise ValueError("A schedule needs at least one action.")
        return cls(
            name=name,
            num_stages=num_stages or 1 + max(a.stage for a in all_actions),
            num_micro_batches=num_micro_batches or 1 + max(a.micro_batch for a in all_actions),
            ranks=ranks,
        )
