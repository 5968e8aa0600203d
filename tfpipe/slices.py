"""Scheduler slices of a process's threads: short ones, so a worker hands tensors over at once.

Design: under Linux's EEVDF scheduler (6.6+), a thread woken on a core whose thread runs a
kernel waits until that thread's slice ends (1.4 ms on this project's 2-core machines) before
it runs, and often a second one. On a one-core worker the thread that sends an activation
or gradient to the next stage is such a woken thread, so the next stage got it 3-4 ms after
it was made (median, against 0.2-0.5 ms from an idle worker), and a 1F1B step waits half a
round trip of that per micro-batch (`benchmarks/slices.py` measures both, side by side).
With the least slice Linux allows (0.1 ms) the hand-over took 0.2-0.3 ms from a busy worker.
A slice only bounds how long a runnable thread waits for a busy core: a thread alone on its
core runs as long as before, so a worker whose cores are not all busy (a GPU's host threads)
loses nothing. Linux 6.12+ reads the slice from `sched_setattr`'s runtime for a fair-class
thread; threads inherit it, so setting it before TensorFlow starts its pools covers them all.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys
from pathlib import Path

SHORT_SLICE_NS = 100_000  # Linux's least (`sched_setattr`'s runtime is clamped to 0.1-100 ms)
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}  # syscall numbers (asm-generic: 274)
_KEEP_POLICY = 0x08  # SCHED_FLAG_KEEP_POLICY


def set_slices(pid: int, slice_ns: int = SHORT_SLICE_NS) -> str | None:
    """Gives every thread of process `pid` a scheduler slice of `slice_ns` nanoseconds,
    keeping each thread's policy and nice; threads the process makes later inherit it.

    Args:
        pid: the process (this one: `os.getpid()`; another needs the rights to renice it).
        slice_ns: the slice, 100,000 to 100,000,000 (the kernel clamps it).

    Returns:
        None when set, else why not (another OS or architecture, or a kernel that refuses).

    Example:
        >>> set_slices(os.getpid())  # None on Linux 6.12+ on x86_64 or aarch64
    """
    number = _SCHED_SETATTR.get(platform.machine())
    if number is None or not sys.platform.startswith("linux"):
        return f"no sched_setattr on {sys.platform} {platform.machine()}"
    libc = ctypes.CDLL(None, use_errno=True)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            nice = os.getpriority(os.PRIO_PROCESS, int(tid))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        # struct sched_attr, first version (48 bytes): size, policy, flags, nice, priority,
        # runtime (a fair-class thread's slice), deadline, period
        attr = struct.pack("IIQiIQQQ", 48, 0, _KEEP_POLICY, nice, 0, slice_ns, 0, 0)
        if libc.syscall(number, int(tid), ctypes.create_string_buffer(attr), 0) != 0:
            err = ctypes.get_errno()
            if err != errno.ESRCH:
                return f"sched_setattr: {os.strerror(err)}"
    return None


def slices(pid: int) -> dict[int, int]:
    """Each thread's scheduler slice in nanoseconds, by thread id (Linux `/proc/PID/task/TID/
    sched`, `se.slice`); empty where the kernel does not show it."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "sched").read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        for line in text.splitlines():
            if line.startswith("se.slice"):
                found[int(task.name)] = int(float(line.split(":")[1]))
    return found
