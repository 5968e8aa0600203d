"""tfpipe: pipeline-parallel training for Keras 3 models on TensorFlow devices.

Public surface: `fit`, `evaluate`, `predict`, `Pipeline`, `configure_cpu_devices`, and the
`schedules` package (pure data).
"""

from tfpipe import schedules
from tfpipe.devices import configure_cpu_devices, default_devices
from tfpipe.errors import DeviceConfigurationError, PipelineError
from tfpipe.pipeline import Pipeline
from tfpipe.trainer import evaluate, fit, predict

__version__ = "0.1.0"

__all__ = [
    "DeviceConfigurationError", "Pipeline", "PipelineError", "configure_cpu_devices",
    "default_devices", "evaluate", "fit", "predict", "schedules", "__version__",
]
