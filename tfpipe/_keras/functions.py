"""The private TensorFlow function machinery the rank loops use, behind one small API.

What it gives: a forward/backward pair, a graph without automatic control dependencies,
calls of concrete functions with explicit captures, and the Grappler options a call is
optimised with.

Design: the rank loops (`tfpipe.executor.rankloop`) need four things TensorFlow has but does not
export: the forward/backward pair it builds to differentiate a call of a `tf.function` (the
forward returns the outputs and the residuals its backward reads; the backward takes output
gradients and residuals), a function graph built without automatic control dependencies
(with them, every op touching one queue is ordered, so two rank loops sharing a queue would
run one after the other: a deadlock), and calls of those functions with their captured inputs
given explicitly (a residual from a loop's TensorList stands in for a captured tensor), and
Grappler options per call: the step's own graph (glue) optimised lightly, the stage functions
it calls fully (`glue_only`, `stage_options`). Written for TensorFlow 2.16-2.21
(`polymorphic_function.concrete_function`, `framework.func_graph`, `eager.context`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
from tensorflow.python.eager import context
from tensorflow.python.eager.polymorphic_function import concrete_function
from tensorflow.python.framework import func_graph


def forward_backward(function: Any, num_seeded: int) -> tuple[Any, Any]:
    """TensorFlow's forward and backward functions for a concrete function's call.

    After this, `function.graph.outputs` lists the outputs then the residuals.

    TensorFlow 2.16-2.21: `ConcreteFunction._delayed_rewrite_functions.forward_backward`.

    Args:
        function: a `ConcreteFunction`.
        num_seeded: how many leading outputs the backward takes gradients for (the
            differentiable ones; outputs after them get none).

    Returns:
        `(forward, backward)`: the forward an `AtomicFunction` called as
        `call_forward(forward, args + function.captured_inputs)`, the backward a
        `ConcreteFunction` called with `call_backward`.
    """
    fw, bw = function._delayed_rewrite_functions.forward_backward(num_seeded)
    return fw, bw


def structure(function: Any) -> tuple[Any, ...]:
    """A concrete function's graph with its names left out: each operation's type, device,
    inputs and control inputs (by operation position, the latter in any order) and
    attributes, then which operations are its inputs and outputs, with their dtypes and
    shapes. Two functions with the same structure compute the same thing from the same
    arguments and captures (their captures in the same order), and TensorFlow builds the
    same gradient for both.

    TensorFlow 2.16-2.21: `FuncGraph.as_graph_def`, `inputs`, `outputs`.
    """
    graph = function.graph
    nodes = graph.as_graph_def().node
    at = {n.name: k for k, n in enumerate(nodes)}

    def ref(name: str) -> tuple[int, str]:
        op, _, out = name.lstrip("^").partition(":")
        return at[op], out

    ops = tuple((n.op, n.device, tuple(ref(i) for i in n.input if not i.startswith("^")),
                 tuple(sorted(ref(i) for i in n.input if i.startswith("^"))),
                 tuple(sorted((k, v.SerializeToString(deterministic=True))
                              for k, v in n.attr.items() if k != "_class")))
                for n in nodes)

    def ends(tensors: Any) -> tuple[Any, ...]:
        return tuple((at[t.op.name], t.value_index, t.dtype, str(t.shape)) for t in tensors)

    return ops, ends(graph.inputs), ends(graph.outputs), tuple(
        (c.dtype, str(c.shape)) for c in function.captured_inputs)


def call_forward(forward: Any, flat: Sequence[Any]) -> list[Any]:
    """Calls a forward function on its flat arguments (captured inputs included)."""
    return list(forward.call_flat(*flat))


def call_backward(backward: Any, seeds: Sequence[Any], captures: Sequence[Any]) -> list[Any]:
    """Calls a backward function on output gradients, with `captures` for its captured inputs
    (residuals from the forward, or the tensors it captured); returns its structured outputs
    (one per input of the differentiated function: a tensor, IndexedSlices or None)."""
    return list(backward._call_flat(list(seeds), list(captures)))


def seed_count(backward: Any) -> int:
    """How many output gradients a backward function takes."""
    return len(backward.graph.inputs) - len(backward.captured_inputs)


def graph_function(name: str, fn: Callable[..., Any], signature: Sequence[Any]) -> Any:
    """A concrete function of `fn` traced without automatic control dependencies.

    TensorFlow 2.16-2.21: `func_graph_from_py_func(add_control_dependencies=False)` and
    `ConcreteFunction.from_func_graph`.
    """
    graph = func_graph.func_graph_from_py_func(
        name, fn, [], {}, add_control_dependencies=False, signature=list(signature))
    return concrete_function.ConcreteFunction.from_func_graph(graph, None, {})


def call_graph_function(function: Any, args: Sequence[Any]) -> list[Any]:
    """Calls a `graph_function` on flat arguments; returns its flat outputs."""
    out = function._call_flat(list(args), function.captured_inputs)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def operation_count(function: Any) -> int:
    """Operations in a concrete function's own graph (not those of the functions it calls)."""
    return len(function.graph.get_operations())


_GLUE_OFF = ("layout_optimizer", "constant_folding", "shape_optimization", "remapping",
             "arithmetic_optimization", "loop_optimization", "function_optimization",
             "memory_optimization", "common_subgraph_elimination", "implementation_selector",
             "debug_stripper", "scoped_allocator_optimization", "pin_to_host_optimization")
"""Grappler's passes turned off for a step graph of glue (`glue_only`): all but the dependency
optimiser (which removes the Identity and NoOp nodes the control flow lowers to)."""

_CALLED = threading.local()


def _options(caller: Any, passes_off: tuple[str, ...]) -> Any:
    """`caller`'s function call options, with Grappler run once and `passes_off` turned off
    (made once per caller configuration: `glue_only` is entered at every step)."""
    return _options_of(caller.executor_type, caller.config_proto_serialized, passes_off)


@functools.cache
def _options_of(executor_type: str | None, serialized: bytes, passes_off: tuple[str, ...]
                ) -> Any:
    config = config_pb2.ConfigProto.FromString(serialized)
    rewrite = config.graph_options.rewrite_options
    for name in passes_off:
        setattr(rewrite, name, rewriter_config_pb2.RewriterConfig.OFF)
    rewrite.meta_optimizer_iterations = rewriter_config_pb2.RewriterConfig.ONE
    # TensorFlow's MLIR graph passes (attribute consolidation, topological sort, shape
    # inference, sinking ops into cond branches): 0.42 s of the steady loop's first run at
    # K = 8, M = 64 (its step and 16 stage functions, 12-block Transformer), no steady step
    # measured faster with them
    rewrite.disable_tfg_optimizer = True
    return context.FunctionCallOptions(executor_type, config)


@contextlib.contextmanager
def glue_only() -> Iterator[None]:
    """Eager calls of functions under this optimise their own graph with Grappler's dependency
    optimiser only; functions they call, made under `stage_options`, with every pass.

    For a step graph of glue around calls of functions that are not inlined: control flow,
    queues and TensorLists (the rank loops), or slicing, losses and gradient sums (the
    unrolled step). The full set of passes took 2.4 s of the rank loops' first run at K = 8
    and 6.5 s of the unrolled step's at K = 4, M = 32 (12-block Transformer), and changed no
    steady step measured. Both run
    Grappler once, not twice: the second pass changed nothing measured and took a third of
    each stage function's set-up, which the first step waits for stage by stage.
    TensorFlow 2.16-2.21: `context.function_call_options` (thread-local), read when a call
    is made.
    """
    ctx = context.context()
    caller = ctx.function_call_options
    outer = getattr(_CALLED, "options", None)
    ctx.function_call_options = _options(caller, _GLUE_OFF)
    _CALLED.options = _options(caller, ())
    try:
        yield
    finally:
        ctx.function_call_options = caller
        _CALLED.options = outer


@contextlib.contextmanager
def stage_options() -> Iterator[None]:
    """Calls of functions made (traced) under this, inside a `glue_only` call, are optimised
    with every Grappler pass (the stage functions); outside one, a no-op."""
    called = getattr(_CALLED, "options", None)
    if called is None:
        yield
        return
    ctx = context.context()
    glue = ctx.function_call_options
    ctx.function_call_options = called
    try:
        yield
    finally:
        ctx.function_call_options = glue
