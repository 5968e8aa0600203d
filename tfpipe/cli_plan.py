"""`tfpipe plan`: profile a saved `.keras` model and print `tfpipe.plan`'s ranked table.

Design: `run` loads the model, makes a random batch of its input shapes and dtypes, and prints
`tfpipe.plan`'s ranked configurations. It makes the logical CPU devices it is asked for
(`--devices 4` without a GPU) before TensorFlow starts, which only a fresh process can do.
Errors raise `PlanError`, which `tfpipe.cli` prints as one line and turns into the exit
status; this module imports nothing from `tfpipe.cli`, so the two form no import cycle.
TensorFlow, Keras and NumPy are imported inside the functions, as in `tfpipe.cli`.
"""

from __future__ import annotations

import argparse
import os


class PlanError(Exception):
    """A `tfpipe plan` error, printed as one line on stderr.

    Args:
        message: the line to print after `tfpipe plan: error: `.
        usage: `True` for a usage error (exit status 2), `False` for a failure (status 1).
    """

    def __init__(self, message: str, usage: bool = True) -> None:
        super().__init__(message)
        self.usage = usage


def run(args: argparse.Namespace) -> int:
    """Runs `tfpipe plan` with the parsed arguments.

    Args:
        args: the namespace of `tfpipe.cli`'s `plan` subparser.

    Returns:
        0 once the table (and the `--plot` PNG) is written.

    Raises:
        PlanError: for an unreadable size, a missing or unloadable model, bad `--devices`, a
            planning error, or a `--plot` that cannot be written.
    """
    from tfpipe.errors import PipelineError
    from tfpipe.planner.costs import parse_bytes

    try:
        budget = None if args.memory_budget is None else parse_bytes(args.memory_budget)
        bandwidth = None if args.bandwidth is None else parse_bytes(args.bandwidth)
    except ValueError as err:
        raise PlanError(str(err)) from None
    if bandwidth is not None and bandwidth <= 0:
        raise PlanError(f"--bandwidth must be above 0 bytes/s, got {args.bandwidth!r}")
    if not os.path.isfile(args.model):
        raise PlanError(f"no model file {args.model!r}: give the path of a model saved "
                        "with model.save('model.keras')", usage=False)
    try:
        devices = _plan_devices(args.devices)
    except PipelineError as err:
        raise PlanError(str(err)) from None
    # Lazy: Keras and TensorFlow load only when a command needs them (`tfpipe schedule` starts
    # fast), and only after _plan_devices has made the logical CPU devices.
    import keras

    import tfpipe

    try:
        model = keras.models.load_model(args.model)
    except Exception as err:  # noqa: BLE001 - any load failure is reported as one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PlanError(f"cannot load {args.model!r}: {first} (custom layers must be "
                        "registered with keras.saving.register_keras_serializable)",
                        usage=False) from None
    try:
        sample = _random_batch(model, args.batch)
        plan = tfpipe.plan(model, sample, devices, budget, bandwidth=bandwidth,
                           repeats=args.repeats)
    except PipelineError as err:
        raise PlanError(str(err), usage=False) from None
    print(plan.table(top=args.top))
    if args.plot is not None:
        try:
            path = plan.plot(args.plot)
        except ImportError as err:
            raise PlanError(f"--plot needs matplotlib ({err}); install it with "
                            "pip install 'tfpipe[plot]'", usage=False) from None
        except OSError as err:
            raise PlanError(f"cannot write --plot {args.plot!r}: {err}", usage=False) from None
        print(f"wrote {path}")
    return 0


def _plan_devices(spec: str) -> list[str]:
    """Device names from `--devices`: a count, or names; makes logical CPU devices as needed.

    Args:
        spec: the `--devices` text, a count such as `"4"` or names such as
            `"/device:GPU:0,/device:GPU:1"`.

    Returns:
        The device names to plan for.

    Raises:
        PipelineError: for a count of 0, more GPUs than visible, or names on a remote job.
    """
    import tensorflow as tf  # lazy: TensorFlow loads only when a command needs it

    from tfpipe.devices import is_local  # lazy, as TensorFlow (it imports TensorFlow)
    from tfpipe.errors import PipelineError

    gpus = tf.config.list_physical_devices("GPU")  # lists hardware; does not start the runtime
    if spec.strip().isdigit():
        count = int(spec)
        if count < 1:
            raise PipelineError(f"--devices {spec!r}: give a count of at least 1, or names")
        if not gpus:
            return _cpu_devices(count)
        if count > len(gpus):
            raise PipelineError(f"--devices {count} asks for {count} GPUs but {len(gpus)} are "
                                f"visible: use --devices {len(gpus)} or fewer")
        return [f"/device:GPU:{i}" for i in range(count)]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise PipelineError(f"--devices {spec!r}: give a count or comma-separated device names")
    specs = []
    for name in names:
        try:
            parsed = tf.DeviceSpec.from_string(name)
        except ValueError:
            raise PipelineError(f"--devices: {name!r} is not a device name such as "
                                "/device:CPU:0") from None
        if not is_local(name):
            raise PipelineError(f"--devices: {name!r} is on a remote job; plan for workers "
                                "from Python with devices=tfpipe.cluster(...)")
        specs.append(parsed)
    cpus = [p.device_index or 0 for p in specs if (p.device_type or "").upper() == "CPU"]
    if cpus and not gpus:
        _cpu_devices(max(cpus) + 1)
    return names


def _cpu_devices(count: int) -> list[str]:
    """`count` logical CPU devices: made now, or the first `count` of those TensorFlow already
    made (when `tfpipe.cli.main` runs inside a process that configured more).

    Args:
        count: how many logical CPU devices are needed.

    Returns:
        The names of `count` logical CPU devices.

    Raises:
        PipelineError: when the devices can no longer be made and fewer than `count` exist.
    """
    import tfpipe
    from tfpipe.errors import DeviceConfigurationError, PipelineError

    try:
        return tfpipe.configure_cpu_devices(count)
    except DeviceConfigurationError as err:
        have = [d for d in tfpipe.default_devices() if "CPU" in d]
        if len(have) < count:
            raise PipelineError(str(err)) from None
        return have[:count]


def _random_batch(model: object, batch: int) -> object:
    """A random batch of `batch` samples for the model's inputs (their shapes and dtypes):
    normal floats, integers in {0, 1} (valid for any embedding), random booleans.

    Args:
        model: the loaded Keras model.
        batch: the number of samples.

    Returns:
        NumPy arrays in the structure of the model's inputs.

    Raises:
        PipelineError: for an input with an unknown dimension besides the batch, or of a
            dtype that cannot be made up (strings).
    """
    # Lazy: Keras and NumPy load only when a command needs them (`tfpipe schedule` starts fast).
    import keras
    import numpy as np

    from tfpipe.errors import PipelineError
    from tfpipe.partition.flatten import model_io

    inputs, _ = model_io(model)
    rng = np.random.default_rng(0)

    def make(t: object) -> object:
        name = getattr(t, "name", "input")
        shape = tuple(t.shape)  # type: ignore[attr-defined]
        dtype = np.dtype(str(t.dtype))  # type: ignore[attr-defined]
        if any(d is None for d in shape[1:]):
            raise PipelineError(
                f"Model input {name!r} has shape {shape} with an unknown dimension besides the "
                "batch: plan from Python with tfpipe.plan(model, real_batch) instead."
            )
        full = (batch, *shape[1:])
        if dtype.kind == "f":
            return rng.standard_normal(full).astype(dtype)
        if dtype.kind in "iu":
            return rng.integers(0, 2, size=full).astype(dtype)
        if dtype.kind == "b":
            return rng.integers(0, 2, size=full).astype(bool)
        raise PipelineError(f"Model input {name!r} has dtype {dtype}, which tfpipe plan cannot "
                            "make up: plan from Python with tfpipe.plan(model, real_batch).")

    return keras.tree.map_structure(make, inputs)
