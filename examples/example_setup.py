"""Device set-up and small helpers shared by the examples in this folder.

`set_up_devices(n)` must run before TensorFlow initialises (before any tensor, model or
dataset is made): it splits the host CPU into `n` logical devices when there is no GPU, and
splits a single GPU into `n` logical GPUs. It returns the device names to pass to
`tfpipe.Pipeline(devices=...)`: `n` of them, or all the GPUs when there are between 2 and
`n - 1` (each then hosts a contiguous run of stages).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import tfpipe  # noqa: E402


def set_up_devices(n: int, gpu_memory_mb: int = 4096) -> list[str]:
    """`n` pipeline devices: the GPUs, one GPU split into `n` logical GPUs, or `n` logical CPUs."""
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) == 1 and n > 1:
        tf.config.set_logical_device_configuration(
            gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=gpu_memory_mb)] * n
        )
    elif not gpus:
        tfpipe.configure_cpu_devices(n)
    return tfpipe.default_devices()[:n]


def verbosity() -> str | int:
    """Keras's progress bar on a terminal; one line per epoch under CI or in a pipe."""
    return 2 if os.environ.get("CI") or not os.isatty(1) else "auto"
