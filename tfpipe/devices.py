"""Device resolution: logical CPU devices, visible GPUs, and mapping stages to device names.

Design: TensorFlow fixes its device list when its runtime initialises, so
`configure_cpu_devices` must run before any tensor is made; doing it later is an error we
explain rather than TensorFlow's terse `RuntimeError`. Stage devices default to the visible
GPUs, else the logical CPU devices. Explicit device lists may be shorter than the stage count
(a device then hosts a contiguous run of stages); implicit ones may not, because silently
stacking stages on one device is rarely what a user who asked for K stages meant.

Remote devices: after `tfpipe.cluster(...)` connects this process to TensorFlow workers,
TensorFlow lists the workers' devices beside the local ones (`/job:worker/replica:0/task:i/
device:CPU:0`). The defaults then are the workers' devices (`worker_devices`), not a mix of
local and remote CPUs, and a remote name must be one of the connected devices.

Whether a device is this process's (`is_local`), whether a name names a device (`matches`)
and the one device of single-device work (`default_device`) are each decided here only;
other modules call these rather than matching device strings themselves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

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
        have = [d for d in tf.config.list_logical_devices("CPU") if is_local(d.name)]
        if len(have) == count:
            return [canonical(d.name) for d in have]
        raise DeviceConfigurationError(
            f"configure_cpu_devices({count}) was called after TensorFlow initialised with "
            f"{len(have)} logical CPU device(s). Call tfpipe.configure_cpu_devices({count}) at "
            "the top of the script, before creating any tensor, model or dataset."
        ) from err
    return [canonical(d.name) for d in tf.config.list_logical_devices("CPU")]


def use_one_gpu(index: int) -> str:
    """Makes physical GPU `index` this process's only GPU, with memory growth on.

    Sets `CUDA_VISIBLE_DEVICES=index` before TensorFlow lists its devices (CUDA reads the
    variable then; importing TensorFlow does not), then turns on memory growth for that GPU,
    so that the process takes GPU memory as it needs it instead of nearly all of it at start.
    Several processes on one machine (`tfpipe worker --gpu I`) then each hold one GPU. If CUDA
    had started already (TensorFlow sees several GPUs), GPU `index` is chosen among them with
    `tf.config.set_visible_devices` instead.

    Args:
        index: the GPU's index among the machine's GPUs, as `nvidia-smi -L` numbers them.

    Returns:
        A line saying which GPU this process uses.

    Raises:
        DeviceConfigurationError: when TensorFlow sees no GPU with that index, or has
            initialised its devices already.
    """
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1 and index < len(gpus):  # CUDA started before the variable was set
        gpus = [gpus[index]]
        try:
            tf.config.set_visible_devices(gpus, "GPU")
        except RuntimeError as err:
            raise DeviceConfigurationError(
                f"GPU {index} cannot be chosen: TensorFlow initialised its devices already. "
                "Choose the GPU first thing in the process."
            ) from err
    if len(gpus) != 1:
        raise DeviceConfigurationError(
            f"GPU {index} was asked for (CUDA_VISIBLE_DEVICES={index}), but TensorFlow sees "
            f"{'no GPU' if not gpus else f'only {len(gpus)} GPUs'}: check the index "
            "(`nvidia-smi -L` lists this machine's GPUs, from 0) and that this TensorFlow has "
            "CUDA and a working driver (`tfpipe info`), or leave the GPU choice out."
        )
    try:
        tf.config.experimental.set_memory_growth(gpus[0], True)
    except RuntimeError as err:
        raise DeviceConfigurationError(
            f"Memory growth cannot be turned on for GPU {index}: TensorFlow initialised its "
            "devices already. Choose the GPU first thing in the process."
        ) from err
    return f"GPU {index} (CUDA_VISIBLE_DEVICES={index}) as /device:GPU:0, memory growth on"


def default_devices() -> list[str]:
    """The devices stages go to when none are named.

    Returns:
        The connected workers' devices (`worker_devices()`) after `tfpipe.cluster(...)`;
        otherwise the visible local GPUs, or else the local logical CPU devices, as full
        device names.
    """
    remote = worker_devices()
    if remote:
        return remote
    local = [d for d in tf.config.list_logical_devices() if is_local(d.name)]
    gpus = [d.name for d in local if d.device_type == "GPU"]
    return gpus or [d.name for d in local if d.device_type == "CPU"]


def worker_devices(job: str = "worker") -> list[str]:
    """The devices of the TensorFlow workers this process is connected to, in task order.

    Each worker contributes its GPUs (all of them, in index order) or, without a GPU, its
    `CPU:0`: one pipeline device per accelerator, and one per CPU-only worker process.

    Args:
        job: the cluster's job name; `tfpipe worker` and `tfpipe.cluster` use `"worker"`.

    Returns:
        Names such as `/job:worker/replica:0/task:1/device:CPU:0`; an empty list when this
        process is not connected to a cluster.

    Example:
        >>> tfpipe.cluster("h1:2222,h2:2222")
        >>> tfpipe.worker_devices()
        ['/job:worker/replica:0/task:0/device:GPU:0', '/job:worker/replica:0/task:1/device:GPU:0']
    """
    by_task: dict[int, dict[str, list[tuple[int, str]]]] = {}
    for d in tf.config.list_logical_devices():
        spec = tf.DeviceSpec.from_string(d.name)
        if spec.job != job or spec.task is None:
            continue
        kinds = by_task.setdefault(spec.task, {})
        kinds.setdefault(spec.device_type, []).append((spec.device_index or 0, canonical(d.name)))
    names: list[str] = []
    for task in sorted(by_task):
        kinds = by_task[task]
        chosen = sorted(kinds["GPU"]) if kinds.get("GPU") else sorted(kinds.get("CPU", []))[:1]
        names.extend(name for _, name in chosen)
    return names


def is_local(device: str) -> bool:
    """Whether a device name belongs to this process (no job, or job `localhost`).

    Args:
        device: a full or partial device name, such as `/device:CPU:1` or
            `/job:worker/replica:0/task:1/device:CPU:0`.

    Returns:
        False for a device of another job (a TensorFlow worker), else True.
    """
    return tf.DeviceSpec.from_string(device).job in (None, "localhost")


def processes(devices: Sequence[str]) -> int:
    """How many processes `devices` belong to: this one, and each worker task.

    Example:
        >>> processes(["/cpu:1", "/job:worker/replica:0/task:0/device:CPU:0",
        ...            "/job:worker/task:1"])
        3
    """
    specs = [tf.DeviceSpec.from_string(d) for d in devices]
    return len({None if is_local(d) else (s.job, s.replica or 0, s.task or 0)
                for d, s in zip(devices, specs)})


HOST = "/job:localhost/replica:0/task:0/device:CPU:0"
"""This process's first CPU: where its data arrives and where a batch is split."""


def default_device() -> str:
    """The one device single-device work (profiling) runs on when none is named.

    Returns:
        `/device:GPU:0` when a GPU is visible, else `/device:CPU:0`.
    """
    return "/device:GPU:0" if tf.config.list_logical_devices("GPU") else "/device:CPU:0"


def canonical(device: str) -> str:
    """Normalises a device string: `"cpu:1"` and `"/job:localhost/.../device:CPU:1"` agree.

    Local devices (no job, or job `localhost`) become `/device:CPU:1`; remote devices keep
    their job, replica and task.
    """
    spec = tf.DeviceSpec.from_string(device)
    if is_local(device):
        spec = spec.replace(job=None, replica=None, task=None)
    text: str = spec.to_string()
    return text


def resolve_devices(devices: Sequence[str] | None, num_stages: int) -> list[str]:
    """Maps each of `num_stages` stages to a device.

    Args:
        devices: explicit device names, or None for `default_devices()`.
        num_stages: K.

    Returns:
        K canonical device names; with fewer explicit devices than stages, device i hosts a
        contiguous run of stages.

    Raises:
        PipelineError: when implicit devices are fewer than stages, a named local device
            does not exist, or a remote device (`/job:...`) is not one of the connected
            cluster's devices (or no cluster is connected: call `tfpipe.cluster` first).
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
    known = [canonical(d.name) for d in tf.config.list_logical_devices()]
    local = {name for name in known if is_local(name)}
    remote = [name for name in known if not is_local(name)]
    for given, name in zip(devices, names):
        if is_local(name):
            if name not in local:
                raise PipelineError(
                    f"Device {given!r} does not exist; visible devices are {sorted(local)}. "
                    "Pass one of those, or call tfpipe.configure_cpu_devices(n) before "
                    "TensorFlow initialises to create logical CPU devices."
                )
        elif not remote:
            raise PipelineError(
                f"Device {given!r} is on a remote job, but this process is not connected to a "
                "cluster. Start the workers with `tfpipe worker` and call "
                "devices = tfpipe.cluster('host:port,host:port') first; pass those devices."
            )
        elif not any(matches(name, r) for r in remote):
            raise PipelineError(
                f"Device {given!r} is not a device of the connected cluster; its devices are "
                f"{remote}. Pass names returned by tfpipe.cluster(...) or "
                "tfpipe.worker_devices()."
            )
    if len(names) > num_stages:
        names = names[:num_stages]
    return [names[s * len(names) // num_stages] for s in range(num_stages)]


def matches(name: str, device: str) -> bool:
    """Whether a possibly partial device name (`/job:worker/task:1`) names `device`.

    Args:
        name: the name asked for; its unset parts match anything.
        device: a device's full name.

    Returns:
        True when every part `name` sets equals that part of `device`.
    """
    want, have = tf.DeviceSpec.from_string(name), tf.DeviceSpec.from_string(device)
    return all(
        getattr(want, f) is None or getattr(want, f) == getattr(have, f)
        for f in ("job", "replica", "task", "device_type", "device_index")
    )
