"""The exception types tfpipe raises, so users can catch pipeline errors by type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class PipelineError(ValueError):
    """A model, argument or device set-up that tfpipe cannot run as asked.

    Messages name the offending value, the stage or layer, and the fix.
    """


class DeviceConfigurationError(RuntimeError):
    """Devices were asked for in a way TensorFlow cannot provide (for example too late)."""


class WorkerUnavailableError(RuntimeError):
    """A TensorFlow worker of the cluster died, stopped answering or could not be reached.

    Raised by `tfpipe.cluster` when a worker does not answer in time, and by
    `tfpipe.Watchdog` in place of the TensorFlow error (or the endless wait) of a training
    step that needed the worker. The original TensorFlow error, if any, is its `__cause__`.

    Attributes:
        address: the worker's `host:port`.
        task: the worker's task index in the cluster (`/job:worker/replica:0/task:<task>`),
            or None when unknown.
        stages: the pipeline stages the worker held, or None when they were not given.
        reason: what was observed, for example "no answer to a status call for 30.0 s".
    """

    def __init__(self, message: str, *, address: str, task: int | None = None,
                 stages: tuple[int, ...] | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.address = address
        self.task = task
        self.stages = stages
        self.reason = reason

    def __reduce__(self) -> tuple[Callable[..., WorkerUnavailableError], tuple[Any, ...]]:
        return (_rebuild_worker_error, (str(self), self.address, self.task, self.stages,
                                        self.reason))


def _rebuild_worker_error(message: str, address: str, task: int | None,
                          stages: tuple[int, ...] | None, reason: str) -> WorkerUnavailableError:
    """Unpickles a `WorkerUnavailableError` (its keyword-only fields need this)."""
    return WorkerUnavailableError(message, address=address, task=task, stages=stages,
                                  reason=reason)


class WorkerOutOfMemoryError(WorkerUnavailableError, PipelineError):
    """A worker, or a stage's device, ran out of memory during a step.

    Raised in place of TensorFlow's error (its `__cause__`) when a `tfpipe worker` was killed
    by the kernel for memory (its out-of-memory sentinel reported it on the worker's port:
    `tfpipe.sentinel`), or when a step failed with TensorFlow's `ResourceExhaustedError` on a
    stage's device (a GPU's allocator out of memory). It is a `WorkerUnavailableError` (the
    worker is gone) and a `PipelineError` (the configuration asks too much of a device: the
    message gives the fix, such as more stages, `schedule="1f1b"`, `recompute=` or more
    micro-batches).

    Attributes:
        address, task, stages, reason: as for `WorkerUnavailableError`; for a device of
            this process, `address` is the device's name and `task` is None.
        device: the device that ran out of memory, when known (for example
            `"/job:worker/replica:0/task:1/device:GPU:0"`).
        limit: the memory limit in bytes that was hit (the worker's memory cgroup limit),
            or None when unknown.
        peak: the highest memory use recorded in bytes (the cgroup's peak), or None.
    """

    def __init__(self, message: str, *, address: str, task: int | None = None,
                 stages: tuple[int, ...] | None = None, reason: str = "",
                 device: str | None = None, limit: int | None = None,
                 peak: int | None = None) -> None:
        super().__init__(message, address=address, task=task, stages=stages, reason=reason)
        self.device = device
        self.limit = limit
        self.peak = peak

    def __reduce__(self) -> tuple[Callable[..., WorkerUnavailableError], tuple[Any, ...]]:
        return (_rebuild_memory_error, (str(self), self.address, self.task, self.stages,
                                        self.reason, self.device, self.limit, self.peak))


def _rebuild_memory_error(message: str, address: str, task: int | None,
                          stages: tuple[int, ...] | None, reason: str, device: str | None,
                          limit: int | None, peak: int | None) -> WorkerOutOfMemoryError:
    """Unpickles a `WorkerOutOfMemoryError`."""
    return WorkerOutOfMemoryError(message, address=address, task=task, stages=stages,
                                  reason=reason, device=device, limit=limit, peak=peak)


RUNTIME_MARK = "tfpipe"
"""Every message of a check that fires inside a traced step starts with this word."""


def runtime_message(text: str) -> str | None:
    """tfpipe's own message inside the text of a TensorFlow run-time error, or None.

    A check that can only fire while the step runs (`tf.debugging.Assert`, `check_numerics`)
    surfaces as a TensorFlow `InvalidArgumentError` whose text buries the message among graph
    node names and a Python stack. `Assert` prints its data as bracketed pieces
    (`assertion failed: [tfpipe: a batch of] [8] [samples ...]`), joined here with spaces;
    `check_numerics` prints its message followed by `: Tensor had NaN values`.

    Args:
        text: `str(error)` of the TensorFlow error.
    """
    for line in text.splitlines():
        if "assertion failed: [" + RUNTIME_MARK in line:
            pieces = line.split("assertion failed: ", 1)[1]
            return " ".join(p.strip().strip("[]") for p in pieces.split("] [")).strip()
        start = line.find(RUNTIME_MARK + " check_numerics:")
        if start >= 0:
            return line[start:].strip()
    return None
