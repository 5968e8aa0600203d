"""Allocator statistics: the one place tfpipe reads TensorFlow's per-device memory counters.

Design: TensorFlow keeps allocator statistics (`tf.config.experimental.get_memory_info`) for
every GPU, but for a CPU only while its CPU allocator is oneDNN's, and TensorFlow turns oneDNN
on by default only on some x86 processors (those with AVX-512 among them); elsewhere the CPU
allocator keeps no counters until `TF_ENABLE_ONEDNN_OPTS=1` is set before TensorFlow starts.
Remote devices (`/job:worker/...`) report none at all. So every reader asks `unavailable` first
and says why in one line instead of dropping a figure silently; benchmarks and tests that need
the counters set `TF_ENABLE_ONEDNN_OPTS=1` themselves, before TensorFlow is imported.
"""

from __future__ import annotations

import tensorflow as tf

from tfpipe.devices import is_local

ONEDNN_HINT = (
    "per-rank memory needs allocator statistics, which TensorFlow keeps on CPU only with "
    "TF_ENABLE_ONEDNN_OPTS=1 (set it before TensorFlow starts)"
)
REMOTE_HINT = "TensorFlow reports no allocator statistics for a remote device"


def local_name(device: str) -> str:
    """The name `get_memory_info` takes for a full device string: `CPU:1`, `GPU:0`.

    Raises:
        ValueError: for a remote device, whose short name would read this process's allocator.
    """
    if not is_local(device):
        raise ValueError(f"{REMOTE_HINT} ({device})")
    return device.split("device:")[-1].upper()


def unavailable(device: str) -> str | None:
    """None when TensorFlow keeps allocator statistics for `device`, else the reason, one line.

    Args:
        device: a full device string (`/job:localhost/replica:0/task:0/device:CPU:1`) or a
            short one (`CPU:1`).
    """
    if not is_local(device):
        return f"{REMOTE_HINT} ({device})"
    try:
        tf.config.experimental.get_memory_info(local_name(device))
    except (ValueError, tf.errors.OpError) as err:
        if "not available" in str(err):
            return ONEDNN_HINT
        return f"{type(err).__name__}: {err}"
    return None


def reset(device: str) -> None:
    """Sets the device's peak to its current use (raises `ValueError` without statistics)."""
    tf.config.experimental.reset_memory_stats(local_name(device))


def peak_bytes(device: str) -> int:
    """The allocator's peak in bytes since the last `reset` (logical CPUs share one allocator)."""
    peak: int = tf.config.experimental.get_memory_info(local_name(device))["peak"]
    return peak


def current_bytes(device: str) -> int:
    """Bytes the device's allocator holds now."""
    current: int = tf.config.experimental.get_memory_info(local_name(device))["current"]
    return current
