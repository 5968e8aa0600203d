"""The exception types tfpipe raises, so users can catch pipeline errors by type."""

from __future__ import annotations


class PipelineError(ValueError):
    """A model, argument or device set-up that tfpipe cannot run as asked.

    Messages name the offending value, the stage or layer, and the fix.
    """


class DeviceConfigurationError(RuntimeError):
    """Devices were asked for in a way TensorFlow cannot provide (for example too late)."""
