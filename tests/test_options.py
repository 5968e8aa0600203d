"""One source of defaults: `tfpipe.fit`, `tfpipe.Pipeline` and `PipelineOptions` agree."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import tfpipe
from tfpipe.options import PipelineOptions

FIELDS = {f.name: f.default for f in dataclasses.fields(PipelineOptions)}


@pytest.mark.parametrize("function", [tfpipe.fit, tfpipe.Pipeline.__init__],
                         ids=["fit", "Pipeline"])
def test_signature_defaults_are_the_options_defaults(function):
    shared = {name: p.default for name, p in inspect.signature(function).parameters.items()
              if name in FIELDS}
    assert len(shared) >= 8, sorted(shared)  # the pipeline options really are shared
    for name, default in shared.items():
        assert default == FIELDS[name], (name, default, FIELDS[name])


def test_options_are_checked_once_when_made():
    with pytest.raises(tfpipe.PipelineError, match=r"micro_batches must be a positive integer"):
        PipelineOptions(micro_batches=0)
    options = PipelineOptions(stages=2, micro_batches=4, schedule="interleaved")
    assert options.chunks == 2 and dataclasses.is_dataclass(options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.stages = 3


def test_jit_compile_auto_follows_the_model_and_is_checked_once():
    auto = PipelineOptions(stages=2)
    assert auto.jit_compile == "auto"
    assert auto.xla(True) is True and auto.xla(False) is False  # the model's own setting
    assert PipelineOptions(jit_compile=True).xla(False) is True
    assert PipelineOptions(jit_compile=False).xla(True) is False
    assert PipelineOptions(stages=2, replicas=2).xla(True) is False  # as Keras under tf.distribute
    for bad in ("on", 1, None):
        with pytest.raises(tfpipe.PipelineError, match=r"jit_compile=.*use 'auto'"):
            PipelineOptions(jit_compile=bad)
    with pytest.raises(tfpipe.PipelineError, match=r"jit_compile=True with replicas=2"):
        PipelineOptions(stages=2, replicas=2, jit_compile=True)


def test_the_whole_step_is_compiled_only_on_one_device_one_copy_one_micro_batch():
    from tfpipe.options import PipelineOptions as Options

    assert Options(stages=1).whole_step_xla(True, 1)
    assert not Options(stages=1).whole_step_xla(False, 1)
    assert not Options(stages=2).whole_step_xla(True, 2)  # one XLA program, one device
    assert not Options(stages=1, micro_batches=4).whole_step_xla(True, 1)  # the split's check
    assert not Options(stages=1, profile=True).whole_step_xla(True, 1)
    assert not Options(stages=1, check_numerics=True).whole_step_xla(True, 1)
