"""Out of memory on a worker or a stage's device, raised as `WorkerOutOfMemoryError` with the fix.

Design: a step that meets a worker the kernel killed for memory fails with TensorFlow's
`UnavailableError: Socket closed`, which says nothing of memory; a GPU that runs out fails it
with `ResourceExhaustedError`, which names the device but no stage. `memory_errors` wraps a
step (`tfpipe.fit`, and `Pipeline`'s Keras calls) and turns both into one clear error:
- a `ResourceExhaustedError`'s "OOM when allocating ... on DEVICE" names the device, and the
  pipeline's stages say which of them live there;
- a worker killed for memory is found by asking the connected workers for their status
  (`tfpipe.health.probe`): its out-of-memory sentinel (`tfpipe.sentinel`) answers on its port
  with a report (`tfpipe.oom_report`). The sentinel binds the port a moment after the worker
  dies, so a worker that is merely unreachable is asked again for up to `REPORT_WAIT_S`.
The stages a worker holds come from the stages' device names (`/job:worker/.../task:i`), as
`tfpipe.Watchdog.for_pipeline` reads them (`stages_by_address`).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import tensorflow as tf

from tfpipe.errors import WorkerOutOfMemoryError
from tfpipe.health import connected_addresses, probe
from tfpipe.oom_report import OomReport, parse

JOB = "worker"
REPORT_WAIT_S = 1.0
"""How long a failed step waits for an unreachable worker's sentinel to report."""

FIX = (
    "Give each device less to hold: split the model over more stages on more workers "
    "(stages=K), use schedule='1f1b' (at most K micro-batches' activations per stage instead "
    "of all M), recompute='except_last' or 'always' (keep only each stage's inputs), or more "
    "micro_batches (smaller micro-batches); tfpipe.plan(model, x, memory_budget=...) ranks "
    "configurations by their predicted memory per device"
)
_OOM_DEVICE = re.compile(r"OOM when allocating tensor.*? on (\S+) by allocator (\S+)")
_ANY_DEVICE = re.compile(r"OOM when allocating tensor.*")
_MEMORY = re.compile(r"\bOOM\b|out of memory", re.IGNORECASE)
_LOST_WORKER = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
                tf.errors.InternalError, tf.errors.UnknownError, tf.errors.DeadlineExceededError,
                tf.errors.ResourceExhaustedError, tf.errors.FailedPreconditionError,
                tf.errors.NotFoundError)


class Scope:
    """What `memory_errors` names in its error: the pipeline's stages, once they exist.

    Attributes:
        stages: the pipeline's stages (each with `.index` and `.device`), or None.
    """

    def __init__(self, stages: Sequence[Any] | None = None) -> None:
        self.stages = stages


@contextlib.contextmanager
def memory_errors(stages: Sequence[Any] | None = None) -> Iterator[Scope]:
    """Turns a TensorFlow error of a step that ran out of memory into `WorkerOutOfMemoryError`.

    Other errors pass unchanged. Set `scope.stages` once the pipeline exists, if it does not
    yet when the block starts.

    Args:
        stages: the pipeline's stages, if known now.

    Yields:
        The `Scope`.

    Raises:
        WorkerOutOfMemoryError: naming the worker or device, its stages and the fix, with the
            TensorFlow error as its `__cause__`.
    """
    scope = Scope(stages)
    try:
        yield scope
    except tf.errors.OpError as err:
        found = diagnose(err, scope.stages)
        if found is None:
            raise
        raise found from err


def diagnose(err: tf.errors.OpError, stages: Sequence[Any] | None,
             addresses: Sequence[str] | None = None,
             wait_s: float = REPORT_WAIT_S) -> WorkerOutOfMemoryError | None:
    """The out-of-memory error behind a step's TensorFlow error, or None when it was not one.

    Args:
        err: the step's error.
        stages: the pipeline's stages, or None.
        addresses: the cluster's workers; default those `tfpipe.cluster` connected to.
        wait_s: how long to keep asking a worker that is unreachable.
    """
    if addresses is None:
        addresses = connected_addresses()
    text = str(err)
    report = parse(text)  # the step met a sentinel itself
    allocator = isinstance(err, tf.errors.ResourceExhaustedError) and _ANY_DEVICE.search(text)
    if report is None and not allocator and isinstance(err, _LOST_WORKER) and addresses:
        report = _ask(addresses, wait_s)
    if report is not None:
        held = None if stages is None else stages_by_address(stages, addresses)
        return worker_error(report, addresses, held, _summary(err))
    if isinstance(err, tf.errors.ResourceExhaustedError) and _MEMORY.search(text):
        return device_error(text, stages, addresses)
    return None  # RESOURCE_EXHAUSTED is also gRPC's "message larger than max", not memory


def _ask(addresses: Sequence[str], wait_s: float) -> OomReport | None:
    """The first report a worker gives, asking them all at once, and the unreachable ones
    again until `wait_s` has passed."""
    pending = list(addresses)
    deadline = time.monotonic() + wait_s
    while pending:
        reasons = probe_all(pending, 1.0)
        found = [r for r in map(parse, reasons.values()) if r is not None]
        if found:
            return found[0]
        pending = [a for a in pending if reasons[a].startswith("unreachable")]
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)
    return None


def probe_all(addresses: Sequence[str], timeout_s: float) -> dict[str, str]:
    """`tfpipe.health.probe` of every address at once: what each said ("" for an answer)."""
    reasons = dict.fromkeys(addresses, f"no answer to a status call within {timeout_s:.1f} s")

    def check(address: str) -> None:
        reasons[address] = probe(address, timeout_s) or ""

    threads = [threading.Thread(target=check, args=(a,), daemon=True) for a in addresses]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s + 1.0)
    return reasons


def await_report(address: str, wait_s: float = REPORT_WAIT_S) -> OomReport | None:
    """Asks one worker (bounded by `wait_s`) whether its sentinel reports an OOM kill."""
    return _ask([address], wait_s)


def stages_by_address(stages: Sequence[Any], addresses: Sequence[str]) -> dict[str, list[int]]:
    """The stage indices each worker of `addresses` holds, read from the stages' devices.

    Args:
        stages: stages with `.index` and `.device`.
        addresses: the cluster's workers, task 0 first.
    """
    held: dict[str, list[int]] = {}
    for stage in stages:
        spec = tf.DeviceSpec.from_string(stage.device)
        if spec.job == JOB and spec.task is not None and spec.task < len(addresses):
            held.setdefault(addresses[spec.task], []).append(stage.index)
    return held


def worker_stages(held: Mapping[str, Sequence[int]], addresses: Sequence[str]) -> list[Any]:
    """Stages known only by the worker that holds them (as `tfpipe.Watchdog` knows them), as
    stages on that worker's default device (`/job:worker/replica:0/task:i`)."""
    return [SimpleNamespace(index=i, device=f"/job:{JOB}/replica:0/task:{task}")
            for task, address in enumerate(addresses) for i in held.get(address, ())]


def worker_error(report: OomReport, addresses: Sequence[str],
                 held: dict[str, list[int]] | None = None,
                 failure: str = "") -> WorkerOutOfMemoryError:
    """The error for a worker its sentinel reported killed for memory.

    Args:
        report: the sentinel's report.
        addresses: the cluster's workers (for the restart command), task 0 first.
        held: the stages each worker holds, or None when unknown.
        failure: what the step failed with, in one line, or "".
    """
    task = report.task if report.task is not None else (
        list(addresses).index(report.address) if report.address in addresses else None)
    stages = (held or {}).get(report.address)
    where = f"/job:{JOB}/replica:0/task:{task}; " if task is not None else ""
    restart = (f"restart it with `tfpipe worker --cluster {','.join(addresses)} --task {task}`"
               if task is not None and addresses else "restart it")
    failed = f" The step failed with {failure}." if failure else ""
    return WorkerOutOfMemoryError(
        f"Worker task {task} at {report.address} ({where}{_held(stages, held is not None)}) "
        f"was {report.summary()}.{failed} {FIX}. Then {restart}, reconnect with "
        "tfpipe.cluster(...) in a new process and resume from your last checkpoint.",
        address=report.address, task=task, stages=tuple(stages) if stages else None,
        reason=report.summary(), limit=report.limit, peak=report.peak,
    )


def device_error(text: str, stages: Sequence[Any] | None,
                 addresses: Sequence[str]) -> WorkerOutOfMemoryError:
    """The error for a `ResourceExhaustedError` whose text is `text` (an allocator out of
    memory on a device, such as a GPU): names the device and the stages on it.

    Args:
        text: the TensorFlow error's text.
        stages: the pipeline's stages, or None.
        addresses: the cluster's workers, task 0 first (empty without a cluster).
    """
    match = _OOM_DEVICE.search(text)
    line = (_ANY_DEVICE.search(text) or re.search(r".+", text))
    reason = line.group(0).strip() if line else "out of memory"
    device = match.group(1) if match else None
    spec = tf.DeviceSpec.from_string(device) if device else None
    remote = spec is not None and spec.job == JOB and spec.task is not None \
        and spec.task < len(addresses)
    on = [s.index for s in stages or () if device and _same_device(s.device, device)]
    held = _held(on, stages is not None)
    if remote and spec is not None:
        address, task = addresses[spec.task], spec.task
        who = f"Worker task {task} at {address} ({device}; {held})"
    else:
        address, task = device or "unknown device", None
        who = f"Device {device} ({held})" if device else f"A device ({held})"
    return WorkerOutOfMemoryError(
        f"{who} ran out of memory: {reason}. {FIX}.",
        address=address, task=task, stages=tuple(on) if on else None, reason=reason,
        device=device,
    )


def _same_device(stage_device: str, device: str) -> bool:
    """Whether a stage's device and a device named in an error are the same device
    (`/device:GPU:0` is `/job:localhost/replica:0/task:0/device:GPU:0`; a stage on
    `/job:worker/task:1`, without a device type, is on any device of that worker)."""
    a, b = tf.DeviceSpec.from_string(stage_device), tf.DeviceSpec.from_string(device)
    local = (None, "localhost")
    same_task = (a.job in local and b.job in local) or (a.job == b.job and a.task == b.task)
    same_kind = a.device_type is None or (a.device_type == b.device_type
                                          and (a.device_index or 0) == (b.device_index or 0))
    return bool(same_task and same_kind)


def _held(stages: Sequence[int] | None, known: bool) -> str:
    """`"pipeline stages 0, 1"`, or what is known instead."""
    if stages:
        return f"pipeline stage{'s' if len(stages) != 1 else ''} {', '.join(map(str, stages))}"
    return "no stage of this pipeline" if known else "its stages not known"


def _summary(err: tf.errors.OpError) -> str:
    lines = str(getattr(err, "message", err) or err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".strip()
