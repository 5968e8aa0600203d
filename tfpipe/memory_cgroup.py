"""A process's memory cgroup (v1 or v2) and the kernel's out-of-memory kill counters, as numbers.

Design: the kernel is the only witness of an out-of-memory kill (the victim gets SIGKILL and
says nothing), so `tfpipe.sentinel` and the memory-capped test harness (`benchmarks/cgroups.py`)
read what it records: a cgroup v1 memory controller's `memory.limit_in_bytes`,
`memory.max_usage_in_bytes`, `memory.failcnt` and the `oom_kill` line of `memory.oom_control`;
cgroup v2's `memory.max`, `memory.peak` and the `max` / `oom_kill` lines of `memory.events`;
and `/proc/vmstat`'s `oom_kill`, the machine-wide count (a kill for the machine's memory, or
one in a group without counters). Where the group sits is read from `/proc/<pid>/cgroup` and
the cgroup mounts in `/proc/self/mountinfo`, so a container's own namespace root works too.
The limit is the effective one: the lowest of the group's and its ancestors' (v1 reports it
as `hierarchical_memory_limit`). Plain reads of kernel files, no TensorFlow and no
third-party import: the sentinel, which must stay small, imports this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

UNLIMITED = 2**62
"""Limits at or above this many bytes mean no limit (v1 shows 9223372036854771712)."""


@dataclass(frozen=True)
class MemoryReading:
    """One reading of a memory cgroup.

    Attributes:
        path: the group's directory, such as `/sys/fs/cgroup/memory/tfpipe-1-task0`.
        version: 1 or 2.
        limit: the effective limit in bytes (the lowest of the group's and its ancestors'),
            or None for no limit.
        usage: the bytes charged to the group now.
        peak: the most bytes ever charged to the group (v1 `memory.max_usage_in_bytes`, v2
            `memory.peak`), or None where the kernel has no such file.
        failcnt: how often a charge hit the limit (v1 `memory.failcnt`, v2 the `max` line of
            `memory.events`).
        oom_kills: processes of the group the kernel killed for memory (the `oom_kill` line),
            or None where the kernel does not count them (before Linux 4.13).
    """

    path: str
    version: int
    limit: int | None
    usage: int | None
    peak: int | None
    failcnt: int | None
    oom_kills: int | None


def cgroup_dir(pid: int | str = "self") -> tuple[Path, int] | None:
    """The directory of a process's memory cgroup and its cgroup version.

    Args:
        pid: a process id, or `"self"`.

    Returns:
        `(directory, 1 or 2)`: the v1 memory controller's group where one is mounted, else
        the v2 group; None where neither can be found (not Linux, no cgroup mounts).
    """
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    groups: dict[str, str] = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            groups["cgroup"] = path
        elif controllers == "":
            groups["cgroup2"] = path
    for fstype, version in (("cgroup", 1), ("cgroup2", 2)):
        if fstype not in groups:
            continue
        for root, point in _mounts(mounts, fstype):
            rel = os.path.relpath(groups[fstype], root)
            if not rel.startswith(".."):
                directory = Path(point) / ("" if rel == "." else rel)
                if directory.is_dir():
                    return directory, version
    return None


def _mounts(mountinfo: list[str], fstype: str) -> list[tuple[str, str]]:
    """(root, mount point) of each mount of `fstype` (v1: those with the memory controller)."""
    found = []
    for line in mountinfo:
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        kind = fields[dash + 1]
        options = fields[dash + 3].split(",") if len(fields) > dash + 3 else []
        if kind == fstype and (fstype == "cgroup2" or "memory" in options):
            found.append((fields[3], fields[4]))
    return found


def read(directory: Path, version: int) -> MemoryReading:
    """Reads a memory cgroup's limit, usage, peak and counters.

    Args:
        directory: the group's directory (see `cgroup_dir`).
        version: its cgroup version, 1 or 2.

    Returns:
        The reading; a file the kernel does not have (or that cannot be read) gives None.
    """
    if version == 1:
        stat = _pairs(directory / "memory.stat")
        limits = [_number(directory / "memory.limit_in_bytes"),
                  stat.get("hierarchical_memory_limit")]
        return MemoryReading(
            str(directory), 1, _lowest(limits), _number(directory / "memory.usage_in_bytes"),
            _number(directory / "memory.max_usage_in_bytes"),
            _number(directory / "memory.failcnt"),
            _pairs(directory / "memory.oom_control").get("oom_kill"),
        )
    events = _pairs(directory / "memory.events")
    return MemoryReading(
        str(directory), 2, _lowest(_v2_limits(directory)),
        _number(directory / "memory.current"), _number(directory / "memory.peak"),
        events.get("max"), events.get("oom_kill"),
    )


def reading_of(pid: int | str = "self") -> MemoryReading | None:
    """`read` of the memory cgroup of process `pid`, or None where it has none to read."""
    found = cgroup_dir(pid)
    return None if found is None else read(*found)


def system_oom_kills() -> int | None:
    """How many processes the kernel has killed for memory since boot (`/proc/vmstat`), on
    the whole machine and in every cgroup; None where the kernel does not say."""
    return _pairs(Path("/proc/vmstat")).get("oom_kill")


def resident_peak(pid: int | str = "self") -> int | None:
    """The process's peak resident set size in bytes (`VmHWM`), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _v2_limits(directory: Path) -> list[int | None]:
    """`memory.max` of a v2 group and of each ancestor that has one."""
    limits = []
    for folder in (directory, *directory.parents):
        if not (folder / "memory.max").exists():
            break  # the root of the hierarchy has no memory.max
        limits.append(_number(folder / "memory.max"))
    return limits


def _lowest(limits: list[int | None]) -> int | None:
    real = [n for n in limits if n is not None and n < UNLIMITED]
    return min(real) if real else None


def _number(path: Path) -> int | None:
    """A file holding one number (`max` is `UNLIMITED`), or None."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _pairs(path: Path) -> dict[str, int]:
    """A file of `name number` lines (`memory.stat`, `memory.events`, `/proc/vmstat`)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    pairs = {}
    for line in lines:
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            pairs[name] = int(value)
    return pairs
