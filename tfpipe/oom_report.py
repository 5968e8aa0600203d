"""What a worker's out-of-memory sentinel tells clients: one sentence, then the same as JSON.

Design: the report travels as the details of a gRPC error status (`tfpipe.sentinel` answers
every call on the dead worker's port with it), so it reaches the client through
`tfpipe.cluster.probe` and, when TensorFlow's own calls meet the sentinel, inside the text of
a TensorFlow error. It is therefore plain text that a person can read in a log, whose last
line is `MARK` followed by one line of JSON that `parse` finds wherever the text ends up.
No TensorFlow: the sentinel imports this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from tfpipe.report import format_bytes

MARK = "tfpipe-oom-report "
"""Starts the JSON line of a report."""

SCOPES = ("cgroup", "system")
"""`cgroup`: the worker's memory cgroup counted the kill; `system`: only the machine's count
(`/proc/vmstat` `oom_kill`) rose as the worker died."""


@dataclass(frozen=True)
class OomReport:
    """A `tfpipe worker` the kernel killed for memory, as its sentinel saw it.

    Attributes:
        task: the worker's task index, or None when it was not given.
        address: the worker's `host:port`.
        pid: the worker's process id.
        scope: `"cgroup"` or `"system"` (see `SCOPES`).
        limit: the effective memory limit of the worker's cgroup in bytes, or None.
        peak: the cgroup's peak charge in bytes, or None.
        failcnt: charges that hit the cgroup's limit, or None.
        oom_kills: the cgroup's out-of-memory kills, or None.
        resident_peak: the worker's own peak resident size (`VmHWM`) last seen, or None.
        cgroup: the cgroup's directory, or None.
    """

    task: int | None
    address: str
    pid: int
    scope: str
    limit: int | None = None
    peak: int | None = None
    failcnt: int | None = None
    oom_kills: int | None = None
    resident_peak: int | None = None
    cgroup: str | None = None

    def summary(self) -> str:
        """What happened, in one sentence without a full stop, for messages and logs."""
        if self.scope == "cgroup" and self.limit is not None:
            what = (f"killed by the kernel for memory: its memory cgroup reached its limit of "
                    f"{format_bytes(self.limit)}")
        elif self.scope == "cgroup":
            what = ("killed by the kernel for memory: the machine ran out (its memory cgroup "
                    "has no limit)")
        else:
            what = ("killed by the kernel for memory, it seems: the machine's out-of-memory "
                    "killer ran as it died")
        figures = [f"peak {format_bytes(self.peak)}" if self.peak is not None else "",
                   f"resident peak last seen {format_bytes(self.resident_peak)}"
                   if self.resident_peak is not None else "",
                   f"{self.failcnt} charges failed at the limit" if self.failcnt else "",
                   f"cgroup {self.cgroup}" if self.cgroup else ""]
        shown = "; ".join(f for f in figures if f)
        return f"{what} ({shown})" if shown else what

    def text(self) -> str:
        """The report as sent: a sentence naming the worker, then `MARK` and the JSON."""
        task = f"task {self.task} " if self.task is not None else ""
        return (f"tfpipe worker {task}at {self.address} (pid {self.pid}) was "
                f"{self.summary()}.\n{MARK}{json.dumps(asdict(self), sort_keys=True)}")


def parse(text: str) -> OomReport | None:
    """The report inside `text` (a gRPC status's details, a probe's reason, a TensorFlow
    error's message), or None when it holds none.

    Args:
        text: any text.
    """
    start = text.rfind(MARK)
    if start < 0:
        return None
    try:
        fields, _ = json.JSONDecoder().raw_decode(text, start + len(MARK))
        return OomReport(**fields)
    except (ValueError, TypeError):
        return None
