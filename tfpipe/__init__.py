"""tfpipe: pipeline-parallel training for Keras 3 models on TensorFlow devices.

Public surface: `fit`, `evaluate`, `predict`, `Pipeline`, `configure_cpu_devices`, the
`schedules` package (pure data), and remote stages on TensorFlow workers: `cluster` (connect
to `tfpipe worker` processes), `worker_devices`, `Watchdog`, `WorkerUnavailableError` and
`WorkerOutOfMemoryError`.
Planning: `plan` profiles a model on its devices and ranks pipeline configurations (`Plan`).
Options: `PipelineOptions` holds a pipeline's options, checked once (`Pipeline.from_options`,
`Plan.best.options()`).

Memory: `build_scope` builds a model whose weights are made only on their stage's device.

Note: `tfpipe.cluster` is the function; its module is `importlib.import_module("tfpipe.cluster")`.
"""

from tfpipe import schedules
from tfpipe.build import build_scope
from tfpipe.cluster import cluster
from tfpipe.devices import configure_cpu_devices, default_devices, worker_devices
from tfpipe.errors import (
    DeviceConfigurationError,
    PipelineError,
    WorkerOutOfMemoryError,
    WorkerUnavailableError,
)
from tfpipe.options import PipelineOptions
from tfpipe.pipeline import Pipeline
from tfpipe.planner import Plan, plan
from tfpipe.trainer import evaluate, fit, predict
from tfpipe.watchdog import Watchdog

__version__ = "0.1.0"

__all__ = [
    "DeviceConfigurationError", "Pipeline", "PipelineError", "Watchdog",
    "WorkerOutOfMemoryError", "WorkerUnavailableError", "cluster", "configure_cpu_devices",
    "default_devices",
    "evaluate", "fit", "predict", "schedules", "worker_devices", "__version__",
    "Plan", "PipelineOptions", "build_scope", "plan",
]
