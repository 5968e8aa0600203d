"""The executor: turns a schedule into Keras train/test/predict steps over device-placed stages."""

from tfpipe.executor.step import Executor

__all__ = ["Executor"]
