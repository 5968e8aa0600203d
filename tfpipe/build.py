"""`build_scope`: build a model whose weights are made only on their stage's device.

Design: a model bigger than one device cannot be built the usual way, since Keras makes every
variable on the default device (GPU:0) as its layers are built, before tfpipe is called.
Keras 3 already has a way to build without storage: a variable created inside a
`keras.StatelessScope` keeps its initializer and shape and makes no tensor (the mechanism
Keras uses for JAX's stateless tracing). `build_scope` is such a scope that leaves the
variables uninitialised on exit and takes them out of Keras's global list of variables to
initialise (the next `StatelessScope` to exit anywhere would otherwise make them all on the
default device). `tfpipe.Pipeline` (and `tfpipe.fit`) then runs each variable's initializer
under `tf.device` of the stage that owns it (`placement.move`): weights, seed states and the
optimizer slots built beside them exist on their stage's device and nowhere else.

Keras draws an initializer's seed when the layer is constructed, not when the initializer
runs, so a model built in the scope gets exactly the weights it gets outside it (tested
against `model.fit` on the same seed). A model already built on the host moves instead, one
variable at a time, each host copy freed as its stage's copy is made
(`_keras.reset_storage`): the host never holds two copies of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from tfpipe._keras import deferred_count, optimizers_made_at_once, take_deferred
from tfpipe.errors import PipelineError

_STATELESS_HINT = "while in a stateless scope"


@contextlib.contextmanager
def build_scope() -> Iterator[None]:
    """Builds Keras models inside it without making their weights anywhere yet.

    Every Keras variable created inside (layer weights, seed-generator states) has a shape, a
    dtype and an initializer but no storage until a `tfpipe.Pipeline` (or `tfpipe.fit`) places
    the model: then each is made from its initializer directly on the device of the stage that
    uses it. Works for Sequential, Functional, nested (KerasHub task models) and subclassed
    models (build a subclassed model inside the scope, for example with `model.build(shape)` or
    a call on a sample batch).

    An optimizer made inside (a KerasHub task compiles itself in its constructor) makes its few
    scalar variables at once, on the default device. Until a pipeline has placed it, the model
    has no weights: plain `fit`, `predict`, `save` or `load_weights` need the pipeline first
    (load pretrained weights after `tfpipe.Pipeline(model, ...)`, into the placed variables,
    one at a time).

    Raises:
        PipelineError: when a layer inside makes a variable from a fixed value (an array
            rather than an initializer), which Keras cannot defer.

    Example:
        >>> with tfpipe.build_scope():
        ...     model = make_big_model()        # no weight is made on any device
        >>> model.compile(optimizer="adam", loss="mse")
        >>> tfpipe.fit(model, x, y, devices=devices, micro_batches=8)  # made per stage
    """
    since = deferred_count()
    try:
        with keras.StatelessScope(initialize_variables=False), optimizers_made_at_once():
            yield
    except ValueError as err:
        if _STATELESS_HINT not in str(err):
            raise
        raise PipelineError(
            "A layer built inside tfpipe.build_scope() made a variable from a fixed value (an "
            "array, not an initializer), which Keras cannot defer: "
            f"{str(err).splitlines()[0]} Give that weight an initializer "
            "(keras.initializers.Constant(value) defers), or build that layer outside the "
            "scope."
        ) from err
    finally:
        take_deferred(since)
