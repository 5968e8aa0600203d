"""Device resolution: logical CPU devices, visible GPUs, and mapping stages to device names.

Design: TensorFlow fixes its device list when its runtime initialises, so
`configure_cpu_devices` must run before any tensor is made; doing it later is an error we
explain rather than TensorFlow's terse `RuntimeError`. Stage devices default to the visible
GPUs, else the logical CPU devices. Explicit device lists may be shorter than the stage count
(a device then hosts a contiguous run of stages); implicit ones may not, because silently
stacking stages on one device is rarely what a user who asked for K stages meant.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from tfpipe.errors import DeviceConfigurationError, PipelineError


def configure_cpu_devices(count: int) -> list[str]:
    """Splits the host CPU into `count` logical devices, before TensorFlow initialises.

    Logical CPU devices share one allocator and one thread pool: they show placement and
    correctness, not real parallel speed (use worker processes for that).

    Args:
        count: number of logical CPU devices, >= 1.

    Returns:
        The canonical logical device names, `["/device:CPU:0", ..., "/device:CPU:3"]`.

    Raises:
        DeviceConfigurationError: if TensorFlow already initialised with another count.

    Example:
        >>> import tfpipe
        >>> tfpipe.configure_cpu_devices(4)   # first thing in the script
    """
    if not isinstance(count, int) or count < 1:
        raise PipelineError(f"configure_cpu_devices needs a positive integer, got {count!r}.")
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError as err:
        have = tf.config.list_logical_devices("CPU")
        if len(have) == count:
            return [canonical(d.name) for d in have]
        raise DeviceConfigurationError(
            f"configure_cpu_devices({count}) was called after TensorFlow initialised with "
            f"{len(have)} logical CPU device(s). Call tfpipe.configure_cpu_devices({count}) at "
            "the top of the script, before creating any tensor, model or dataset."
        ) from err
    return [canonical(d.name) for d in tf.config.list_logical_devices("CPU")]


def default_devices() -> list[str]:
    """The visible GPUs, or else the logical CPU devices, as full device names."""
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def canonical(device: str) -> str:
    """Normalises a device string: `"cpu:1"` and `"/job:localhost/.../device:CPU:1"` agree.

    Local devices (no job, or job `localhost`) become `/device:CPU:1`; remote devices keep
    their job, replica and task.
    """
    spec = tf.DeviceSpec.from_string(device)
    if spec.job in (None, "localhost"):
        spec = spec.replace(job=None, replica=None, task=None)
    return spec.to_string()


def resolve_devices(devices: Sequence[str] | None, num_stages: int) -> list[str]:
    """Maps each of `num_stages` stages to a device.

    Args:
        devices: explicit device names, or None for `default_devices()`.
        num_stages: K.

    Returns:
        K canonical device names; with fewer explicit devices than stages, device i hosts a
        contiguous run of stages.

    Raises:
        PipelineError: when implicit devices are fewer than stages, or a named local device
            does not exist.
    """
    if devices is None:
        available = default_devices()
        if len(available) < num_stages:
            raise PipelineError(
                f"stages={num_stages} needs {num_stages} devices but only {len(available)} are "
                f"visible ({available}). Call tfpipe.configure_cpu_devices({num_stages}) before "
                "TensorFlow initialises, or pass devices=[...] explicitly to place several "
                "stages on one device."
            )
        return [canonical(d) for d in available[:num_stages]]
    if isinstance(devices, str) or not devices:
        raise PipelineError(
            f"devices must be a non-empty list of device names, got {devices!r}; for example "
            "devices=['/device:CPU:0', '/device:CPU:1']."
        )
    names = [canonical(d) for d in devices]
    local = {canonical(d.name) for d in tf.config.list_logical_devices()}
    for given, name in zip(devices, names):
        if "job:" not in name and name not in local:
            raise PipelineError(
                f"Device {given!r} does not exist; visible devices are {sorted(local)}. "
                "Pass one of those, or call tfpipe.configure_cpu_devices(n) before TensorFlow "
                "initialises to create logical CPU devices."
            )
    if len(names) > num_stages:
        names = names[:num_stages]
    return [names[s * len(names) // num_stages] for s in range(num_stages)]
