"""The pipeline monitor writes per-rank TensorBoard scalars and the measured timeline PNG."""

from __future__ import annotations

import os

import pytest
import tensorflow as tf

import tfpipe
import tfpipe.callbacks
from tests.models import build, data


def test_monitor_writes_scalars_and_png(tmp_path):
    model = build("mlp", "adam")
    x, y = data("mlp")
    pipe = tfpipe.Pipeline(model, stages=4, micro_batches=4, schedule="1f1b", profile=True)
    monitor = tfpipe.callbacks.PipelineMonitor(pipe, str(tmp_path))
    pipe.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
    assert open(tmp_path / "timeline.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    events = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "pipeline")
              for f in files if "tfevents" in f]
    tags = {(e.step, v.tag) for path in events for e in tf.compat.v1.train.summary_iterator(path)
            for v in e.summary.value}
    for epoch in (0, 1):
        assert (epoch, "step_ms") in tags
        for rank in range(4):
            assert {(epoch, f"rank{rank}/compute_ms"), (epoch, f"rank{rank}/idle_ms"),
                    (epoch, f"rank{rank}/peak_mib")} <= tags
    step = monitor.last["step_ms"]
    for rank in range(4):
        compute = monitor.last[f"rank{rank}/compute_ms"]
        assert 0 < compute and monitor.last[f"rank{rank}/idle_ms"] == pytest.approx(max(step - compute, 0.0))
    # the last stage computes the loss and the first stage's backward is the shortest: on a
    # 1F1B pipeline the ranks do not all report the same work
    assert len({round(monitor.last[f"rank{r}/compute_ms"], 6) for r in range(4)}) > 1


def test_monitor_needs_profiling():
    pipe = tfpipe.Pipeline(build("mlp"), stages=2)
    with pytest.raises(tfpipe.PipelineError, match=r"profile=True"):
        tfpipe.callbacks.PipelineMonitor(pipe, "logs")
