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
