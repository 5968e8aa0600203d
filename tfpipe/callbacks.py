"""Keras callbacks that show what the pipeline does: per-stage compute, idle time and memory.

Design: the measurement is the executor's (`Pipeline(profile=True)` stamps every action of each
training step); this callback only turns the latest step's timeline into TensorBoard scalars
at each epoch end, and draws it once as a PNG after the first epoch. Compute time of a rank is
the summed span of its actions; idle time is the rest of the step (its share of the bubble),
both from `tfpipe.schedules.timeline`.
Per-rank peak memory comes from `tfpipe.allocator`, the peak of each epoch (reset when the epoch
begins); where TensorFlow keeps no allocator
statistics (a CPU without oneDNN, a remote worker) the monitor says so once, in one warning
line, and writes the other scalars.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import keras
import tensorflow as tf

from tfpipe import allocator
from tfpipe.errors import PipelineError
from tfpipe.schedules import plot
from tfpipe.schedules.timeline import idle, rank_busy


class PipelineMonitor(keras.callbacks.Callback):  # type: ignore[misc]  # Keras is untyped (Any)
    """Writes per-rank compute and idle time and memory to TensorBoard, and the timeline PNG.

    Args:
        pipeline: a `tfpipe.Pipeline` built with `profile=True`.
        log_dir: TensorBoard log directory (scalars go to `log_dir/pipeline`).
        png: where to draw the measured timeline after the first epoch; default
            `log_dir/timeline.png`; None to skip.

    Raises:
        PipelineError: when the pipeline was not built with `profile=True`.

    Example:
        >>> pipe = tfpipe.Pipeline(model, stages=4, micro_batches=8, profile=True)
        >>> pipe.fit(data, epochs=3, callbacks=[tfpipe.callbacks.PipelineMonitor(pipe, "logs")])
    """

    def __init__(self, pipeline: Any, log_dir: str, png: str | None = "") -> None:
        super().__init__()
        if pipeline.executor.stamps is None:
            raise PipelineError(
                "PipelineMonitor reads the measured timeline: build the Pipeline with "
                "profile=True, for example tfpipe.Pipeline(model, stages=4, profile=True)."
            )
        self.pipeline = pipeline
        self.log_dir = log_dir
        self.png = os.path.join(log_dir, "timeline.png") if png == "" else png
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "pipeline"))
        self.last: dict[str, float] = {}
        missing = {
            st.device: why for st in pipeline.stages
            if (why := allocator.unavailable(st.device)) is not None
        }
        if missing:
            warnings.warn(
                f"PipelineMonitor writes no rank*/peak_mib scalars for "
                f"{len(missing)} of {len(pipeline.stages)} stages: "
                f"{'; '.join(sorted(set(missing.values())))}.",
                stacklevel=2,
            )
        self.memory_devices = [st.device for st in pipeline.stages if st.device not in missing]

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        for device in self.memory_devices:  # each epoch's peak, not the process's
            allocator.reset(device)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        timeline = self.pipeline.timeline()
        step, busy = rank_busy(timeline)
        devices = {
            self.pipeline.stages[st].device: r
            for st, r in (
                (st.index, self.pipeline.schedule.rank_of(st.index)) for st in self.pipeline.stages
            )
        }
        self.last = {"step_ms": step}
        with self.writer.as_default(step=epoch):
            tf.summary.scalar("step_ms", step)
            for rank, ms in sorted(busy.items()):
                self.last[f"rank{rank}/compute_ms"] = ms
                self.last[f"rank{rank}/idle_ms"] = idle(step, ms)
                tf.summary.scalar(f"rank{rank}/compute_ms", ms)
                tf.summary.scalar(f"rank{rank}/idle_ms", idle(step, ms))
            for device, rank in devices.items():
                if device in self.memory_devices:
                    peak = allocator.peak_bytes(device) / 2**20
                    self.last[f"rank{rank}/peak_mib"] = peak
                    tf.summary.scalar(f"rank{rank}/peak_mib", peak)
        self.writer.flush()
        if epoch == 0 and self.png:
            plot(timeline, self.png, title=f"measured step, epoch 1: {step:.1f} ms")

