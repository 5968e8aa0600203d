"""The pipeline monitor writes per-rank TensorBoard scalars and the measured timeline PNG."""

from __future__ import annotations

import os
import warnings

import pytest
import tensorflow as tf

import tfpipe
import tfpipe.allocator
import tfpipe.callbacks
from tests.models import build, data


def test_monitor_writes_scalars_and_png(tmp_path):
    """With allocator statistics (oneDNN on) every rank gets a peak; without (make test's
    oneDNN-off run), one warning line says why and the other scalars are still written."""
    model = build("mlp", "adam")
    x, y = data("mlp")
    pipe = tfpipe.Pipeline(model, stages=4, micro_batches=4, schedule="1f1b", profile=True)
    stats = tfpipe.allocator.unavailable("CPU:0") is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = tfpipe.callbacks.PipelineMonitor(pipe, str(tmp_path))
    said = [str(w.message) for w in caught if "peak_mib" in str(w.message)]
    if stats:
        assert said == []
    else:  # the one clear line, naming the switch
        assert len(said) == 1 and "4 of 4 stages" in said[0], said
        assert "TF_ENABLE_ONEDNN_OPTS=1" in said[0], said
    pipe.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
    assert open(tmp_path / "timeline.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    events = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "pipeline")
              for f in files if "tfevents" in f]
    tags = {(e.step, v.tag) for path in events for e in tf.compat.v1.train.summary_iterator(path)
            for v in e.summary.value}
    for epoch in (0, 1):
        assert (epoch, "step_ms") in tags
        for rank in range(4):
            assert {(epoch, f"rank{rank}/compute_ms"), (epoch, f"rank{rank}/idle_ms")} <= tags
            assert ((epoch, f"rank{rank}/peak_mib") in tags) == stats
            if stats:  # (this model's tensors are too small to move the allocator's count)
                assert monitor.last[f"rank{rank}/peak_mib"] >= 0
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
