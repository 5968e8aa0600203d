"""Test set-up: four logical CPU devices, made before TensorFlow initialises.

oneDNN: TensorFlow turns it on by default only on some x86 processors, and it changes both
numerics and whether the CPU allocator keeps statistics (`tfpipe.allocator`). The suite runs
with `TF_ENABLE_ONEDNN_OPTS=1` unless the caller set the variable, so that a run means the same
on every machine; `make test` then runs the core transparency tests again with it set to 0.
The header of every pytest run says which.
"""

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import tfpipe  # noqa: E402

tfpipe.configure_cpu_devices(4)


def pytest_report_header(config):
    from tfpipe import allocator

    stats = "on" if allocator.unavailable("CPU:0") is None else "off"
    return (f"oneDNN: TF_ENABLE_ONEDNN_OPTS={os.environ['TF_ENABLE_ONEDNN_OPTS']} "
            f"(CPU allocator statistics {stats})")


@pytest.fixture
def glue_calls(monkeypatch):
    """The `_keras.functions.glue_only` contexts entered during the test (one per call of the
    step `fit` runs), counted."""
    from tfpipe._keras import functions

    entered: list[int] = []
    glue_only = functions.glue_only

    def counted():
        entered.append(len(entered))
        return glue_only()

    monkeypatch.setattr(functions, "glue_only", counted)
    return entered
