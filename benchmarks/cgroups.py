"""Memory-capped `tfpipe worker`s for tests and benchmarks: each in its own cgroup v1 memory group.

A worker started by `CappedWorkerPool` runs in a memory cgroup of its own, made as a child of
this process's memory cgroup (`tfpipe-<pid>-<n>-task<i>`), with `memory.limit_in_bytes` set
to the cap and `memory.swappiness` to 0 (in a v1 group this stops swapping for the group's
own reclaim, even where the machine has swap, so a worker over its cap is killed rather than
swapped; a `memory.memsw.limit_in_bytes` would do too, but then the failed charges are
counted in `memory.memsw.failcnt`, not `memory.failcnt`). The kernel then SIGKILLs a worker
that needs more than its cap, as it would on a machine that small, and records it
(`memory.failcnt`, the `oom_kill` line of `memory.oom_control`).

Design:
- The process joins its group before TensorFlow starts: the worker's command runs under
  `sh -c 'echo $$ > cgroup.procs && exec ...'` (`WorkerPool.launcher`), so the worker's pid
  is the started process's (signals and exit statuses work as without a cap), nothing of
  Python runs between fork and exec (unlike a `preexec_fn`, safe in a threaded process), and
  the worker's out-of-memory sentinel, its child, inherits the group.
- Readings come from `tfpipe.memory_cgroup` (`CappedWorkerPool.reading`): limit, usage,
  peak (`memory.max_usage_in_bytes`), failcnt and oom_kills.
- Cleanup always happens: `close` (also on leaving the `with` block, on an error, on
  KeyboardInterrupt, and at interpreter exit) ends the workers, SIGKILLs whatever of ours is
  still in each group (a sentinel reporting a kill), waits until the group is empty and
  removes it. Groups left by a process that no longer exists are removed when empty.
- Where cgroups cannot be written, `unavailable()` says why in one line (tests then skip
  with that reason): not Linux, no cgroup v1 memory controller (cgroup v2 only: its
  controller delegation rules differ, and this harness writes v1 files), or no permission.

Usage:
    reason = cgroups.unavailable()
    if reason:
        pytest.skip(reason)
    with cgroups.CappedWorkerPool(tmp_path, limit=int(1.5 * cgroups.GIB)) as pool:
        addresses, workers = pool.start(4)
        ...
        print(pool.reading(0).peak)
"""

from __future__ import annotations

import atexit
import itertools
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from tfpipe import memory_cgroup
from tfpipe.processes import READY_TIMEOUT_S, WorkerPool, gone

GIB = 2**30
REMOVE_TIMEOUT_S = 10.0
"""How long `remove_group` waits for a group's processes to be gone."""

_PREFIX = "tfpipe-"
_counter = itertools.count()
_open_pools: list[CappedWorkerPool] = []


def parent_group() -> Path:
    """The v1 memory cgroup this process is in, under which capped groups are made.

    Raises:
        RuntimeError: with `unavailable()`'s reason, when there is none to write to.
    """
    found = memory_cgroup.cgroup_dir()
    if found is None:
        raise RuntimeError("no memory cgroup found for this process (read /proc/self/cgroup "
                           "and the cgroup mounts in /proc/self/mountinfo): not Linux?")
    directory, version = found
    if version != 1:
        raise RuntimeError(f"the memory controller here is cgroup v{version} ({directory}): "
                           "this harness writes cgroup v1 files (memory.limit_in_bytes)")
    return directory


def unavailable() -> str | None:
    """Why memory-capped workers cannot be started here, or None when they can.

    Makes and removes a probe group with a limit, as `CappedWorkerPool` will.
    """
    try:
        parent = parent_group()
    except RuntimeError as err:
        return f"memory cgroups unavailable: {err}"
    probe = parent / f"{_PREFIX}{os.getpid()}-probe"
    try:
        probe.mkdir()
        try:
            (probe / "memory.limit_in_bytes").write_text(str(GIB))
        finally:
            probe.rmdir()
    except OSError as err:
        return (f"memory cgroups unavailable: cannot make a group with a limit in {parent} "
                f"({err}); this needs root or a cgroup delegated to this user")
    return None


def make_group(parent: Path, name: str, limit: int) -> Path:
    """Makes memory cgroup `parent/name` capped at `limit` bytes, which it does not swap.

    Returns:
        Its directory.
    """
    group = parent / name
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit))
    (group / "memory.swappiness").write_text("0")
    return group


def remove_group(group: Path, timeout_s: float = REMOVE_TIMEOUT_S) -> None:
    """SIGKILLs the processes left in a group we made, waits until it is empty and removes it.

    Raises:
        RuntimeError: naming the pids still there after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while group.exists():
        pids = procs(group)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot remove cgroup {group}: {err}; processes still "
                                   f"in it: {pids}") from err
            time.sleep(0.05)


def procs(group: Path) -> list[int]:
    """The pids in a group's `cgroup.procs` (none once it is gone)."""
    try:
        return [int(line) for line in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def remove_stale(parent: Path) -> None:
    """Removes empty capped groups whose maker (the pid in their name) no longer exists."""
    for group in parent.glob(f"{_PREFIX}*"):
        maker = group.name[len(_PREFIX):].split("-", 1)[0]
        if maker.isdigit() and int(maker) != os.getpid() and gone(int(maker)):
            try:
                group.rmdir()
            except OSError:
                pass  # not empty: left alone (its processes are not ours to end)


class CappedWorkerPool(WorkerPool):
    """A `WorkerPool` whose every worker task runs in its own memory cgroup capped at `limit`.

    A task restarted with `restart` goes back into its group. Usable as a context manager;
    `close` ends the workers and removes the groups.

    Args:
        directory: where the workers' logs go.
        limit: each worker's memory cap in bytes.
        env: the workers' environment (default `tfpipe.processes.worker_env()`).
        threads: `tfpipe worker --threads N`.
        ready_timeout_s: the longest wait for a batch of workers to be ready.

    Raises:
        RuntimeError: when memory cgroups cannot be written here (`unavailable()` says why).
    """

    def __init__(self, directory: Path, limit: int, env: Mapping[str, str] | None = None,
                 threads: int = 1, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        super().__init__(directory, env, threads, ready_timeout_s)
        self.limit = limit
        self.parent = parent_group()
        remove_stale(self.parent)
        self.name = f"{_PREFIX}{os.getpid()}-{next(_counter)}"
        self.groups: dict[int, Path] = {}
        _open_pools.append(self)

    def launcher(self, task: int) -> list[str]:
        """A shell that moves itself into the task's group, then becomes the worker."""
        if task not in self.groups:
            self.groups[task] = make_group(self.parent, f"{self.name}-task{task}", self.limit)
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"',
                str(self.groups[task] / "cgroup.procs")]

    def reading(self, task: int) -> memory_cgroup.MemoryReading:
        """The task's group now: limit, usage, peak, failcnt, oom_kills."""
        return memory_cgroup.read(self.groups[task], 1)

    def close(self) -> None:
        """Ends every worker, then empties and removes every group (see `remove_group`)."""
        try:
            self.stop_all()
        finally:
            errors = []
            for group in self.groups.values():
                try:
                    remove_group(group)
                except RuntimeError as err:
                    errors.append(str(err))
            if self in _open_pools:
                _open_pools.remove(self)
            if errors:
                raise RuntimeError("; ".join(errors))

    def __enter__(self) -> CappedWorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_everything() -> None:
    for pool in list(_open_pools):
        try:
            pool.close()
        except RuntimeError:
            pass
