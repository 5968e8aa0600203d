"""The one adapter over private Keras and TensorFlow: every internal read and every patch.

Design: tfpipe reaches past Keras's public API in a few places: it reads the symbolic graph
of layer calls, runs a Functional model op by op, calls the compiled loss and loss tracker,
re-creates a variable's storage on another device, re-keys the optimizer's bookkeeping, and
lends its own steps (and atomic saves, and per-device optimizer updates) to the user's model
and optimizer for one Keras call. Each such reach is one small function here, with a line
saying what it reads and which Keras versions it was written for, so a Keras or TensorFlow
upgrade is checked, and fixed, in this module alone. Callers keep their own logic; the
functions here do nothing but the read or the patch. Patches are instance attributes that
shadow the class's (`obj.__dict__[name]`), and are always removed afterwards, so the user's
model and optimizer are left as they were (the one class patch, `optimizers_made_at_once`,
lasts only while a `tfpipe.build_scope` is open). The package's modules hold the reaches by
what they touch: `graph` (the symbolic graph), `compiled` (loss and metrics), `variables`
(variables and optimizers), `model` (what is lent to the user's model, and collectives),
`data` (a `tf.data` pipeline's last transformation); everything is imported from
`tfpipe._keras` itself.
"""

from __future__ import annotations

from tfpipe._keras import functions
from tfpipe._keras.compiled import (
    compile_key,
    compiled_loss,
    has_compiled_metrics,
    loss_tracker,
    unscale_loss,
)
from tfpipe._keras.data import last_transformation
from tfpipe._keras.graph import (
    call_index,
    inner_functional,
    is_functional,
    layer_name_of,
    node_arguments,
    node_inputs,
    node_layer,
    node_of,
    node_outputs,
    run_graph,
    run_op_by_op,
    sublayers,
)
from tfpipe._keras.model import (
    cache_on,
    cached_on,
    collective_sum,
    lend_methods,
    lend_moments,
    wrap_train_function,
)
from tfpipe._keras.variables import (
    deferred_count,
    initialize_deferred,
    is_deferred,
    lend_update_steps,
    optimizers_made_at_once,
    per_variable_candidates,
    rekey_optimizer,
    reset_storage,
    take_deferred,
    tracked_variables,
    var_key,
)

__all__ = [
    "layer_name_of",
    "node_of",
    "call_index",
    "node_layer",
    "node_inputs",
    "node_outputs",
    "node_arguments",
    "inner_functional",
    "sublayers",
    "is_functional",
    "run_op_by_op",
    "run_graph",
    "compiled_loss",
    "has_compiled_metrics",
    "functions",
    "compile_key",
    "loss_tracker",
    "unscale_loss",
    "reset_storage",
    "is_deferred",
    "initialize_deferred",
    "take_deferred",
    "optimizers_made_at_once",
    "deferred_count",
    "var_key",
    "tracked_variables",
    "rekey_optimizer",
    "per_variable_candidates",
    "lend_update_steps",
    "lend_methods",
    "lend_moments",
    "wrap_train_function",
    "cached_on",
    "cache_on",
    "collective_sum",
    "last_transformation",
]
