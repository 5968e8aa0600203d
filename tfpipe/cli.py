"""The `tfpipe` command line: `schedule` draws, `plan` plans, `info` reports, `worker` serves.

Design: each subcommand imports what it needs inside its own function. `schedule` uses only
the pure-data `tfpipe.schedules` modules (no TensorFlow work, no devices); `info` imports
TensorFlow, Keras and NumPy to report them and lists devices, the one thing that starts
TensorFlow's runtime. Usage errors (an unknown schedule, a size that is not a positive
integer, chunks a schedule cannot use) print one line naming the value and exit with status
2, like argparse's own errors; nothing prints a traceback for them.

`plan` loads a saved `.keras` model and prints `tfpipe.plan`'s ranked configurations; it is
implemented in `tfpipe.cli_plan`, whose `PlanError`s are printed here like the other errors.

`worker` runs one task of a `tf.distribute.Server` cluster (`tfpipe.cluster.serve`) until
SIGTERM or SIGINT, then ends the process with status 0 through `os._exit`: TensorFlow's gRPC
server has no clean stop, and its threads must not race the interpreter's shutdown. It is
implemented in `tfpipe.cli_worker` (its GPU, its out-of-memory sentinel, the order they
start in).

Note: `python -m tfpipe` and the `tfpipe` console script import the `tfpipe` package first,
and its `__init__` imports TensorFlow, so even `tfpipe schedule` pays TensorFlow's import time
(and its start-up log lines on stderr) until that import is made lazy.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from tfpipe import cli_plan, cli_worker, sentinel

EXIT_USAGE = 2
EXIT_FAILURE = 1


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """argparse type: an integer >= `minimum`, with an error that names the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a {what} integer, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_index = _int_at_least(0, "non-negative")


def _seconds(text: str) -> float:
    """argparse type: a number of seconds >= 0, with an error that names the value."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


_Subparsers = argparse._SubParsersAction  # the type of `add_subparsers`'s result


def build_parser() -> argparse.ArgumentParser:
    """The `tfpipe` argument parser with its `schedule`, `info`, `worker` and `plan` subcommands.

    Returns:
        The parser; each subcommand sets `func`, the function that runs it.
    """
    parser = _Parser(
        prog="tfpipe",
        description="Pipeline-parallel training for Keras 3 on TensorFlow: command-line tools.",
    )
    parser.add_argument("--version", action="version", version=f"tfpipe {_tfpipe_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_schedule_parser(sub)
    _add_info_parser(sub)
    _add_worker_parser(sub)
    _add_plan_parser(sub)
    return parser


def _add_schedule_parser(sub: _Subparsers[_Parser]) -> None:
    """Adds the `schedule` subcommand.

    Args:
        sub: the subparsers of `build_parser`'s parser.
    """
    from tfpipe.schedules import DEFAULT_CHUNKS, GENERATORS

    names = ", ".join(GENERATORS)
    several = ", ".join(repr(name) for name in DEFAULT_CHUNKS)
    sched = sub.add_parser(
        "schedule",
        help="print a schedule's step x rank grid, its simulated bubble and peak memory",
        description=(
            "Print a pipeline schedule's step x rank grid (unit-time steps), then time it with "
            "forward = 1 and backward = 2 per stage and no transfer delay: step time, bubble "
            "fraction and the peak number of micro-batches in flight per stage. No TensorFlow "
            "work is done."
        ),
    )
    sched.add_argument("name", metavar="NAME", help=f"schedule name: one of {names}")
    sched.add_argument(
        "--stages", type=_positive_int, required=True, metavar="K",
        help="pipeline stages K, one per device (rank), as tfpipe.fit(stages=K)",
    )
    sched.add_argument(
        "--micro-batches", type=_positive_int, required=True, metavar="M",
        help="micro-batches M per training step",
    )
    sched.add_argument(
        "--chunks", type=_positive_int, default=None, metavar="V",
        help=f"model pieces per device for {several} (default 2; the model is cut into "
        "K*V stages); other schedules take only 1",
    )
    sched.add_argument("--png", metavar="PATH", default=None,
                       help="also write the simulated timeline as a PNG (needs matplotlib)")
    sched.set_defaults(func=_schedule)


def _add_info_parser(sub: _Subparsers[_Parser]) -> None:
    """Adds the `info` subcommand.

    Args:
        sub: the subparsers of `build_parser`'s parser.
    """
    info = sub.add_parser(
        "info",
        help="print tfpipe, TensorFlow, Keras, NumPy and Python versions and the devices",
        description="Print the versions tfpipe runs with and the devices TensorFlow sees.",
    )
    info.set_defaults(func=_info)


def _add_worker_parser(sub: _Subparsers[_Parser]) -> None:
    """Adds the `worker` subcommand.

    Args:
        sub: the subparsers of `build_parser`'s parser.
    """
    worker = sub.add_parser(
        "worker",
        help="run one TensorFlow worker of a cluster, to hold pipeline stages",
        description=(
            "Run one worker task of a TensorFlow cluster (a tf.distribute.Server of job "
            "'worker') until SIGTERM or Ctrl-C. A client then connects with "
            "devices = tfpipe.cluster('host:port,...') and trains with tfpipe.fit(..., "
            "devices=devices). The cluster comes from --cluster and --task, or else from the "
            "TF_CONFIG environment variable. Prints 'tfpipe worker I ready at HOST:PORT' when "
            "it accepts connections. The server has no authentication: run it only on a "
            "trusted network."
        ),
    )
    worker.add_argument(
        "--cluster", metavar="HOST:PORT,...", default=None,
        help="every worker's address, task 0 first, the same list on every worker and the "
        "client (default: the 'worker' job of TF_CONFIG)",
    )
    worker.add_argument(
        "--task", type=_index, default=None, metavar="I",
        help="this worker's index in --cluster; it listens on that address's port "
        "(default: the task of TF_CONFIG)",
    )
    worker.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N",
        help="thread pool sizes in the server's ConfigProto. Note: the pools that run a "
        "client's steps follow the client's settings; limit those with "
        "tfpipe.cluster(..., threads=N) in the client",
    )
    worker.add_argument(
        "--cpus", type=cli_worker.parse_cpus, default=None, metavar="LIST",
        help="run only on these CPU cores, such as 0 or 0-3,8 (Linux: the affinity of every "
        "thread of the worker, set before TensorFlow starts); a worker emulating one device "
        "per core, or one NUMA node's worker, then keeps to its cores",
    )
    worker.add_argument(
        "--gpu", type=_index, default=None, metavar="I",
        help="use only GPU I of this machine (as nvidia-smi -L numbers them): sets "
        "CUDA_VISIBLE_DEVICES=I before TensorFlow starts and turns on memory growth, so that "
        "workers sharing a machine do not each reserve every GPU",
    )
    worker.add_argument(
        "--oom-report-s", type=_seconds, default=sentinel.DEFAULT_TTL_S, metavar="S",
        help="if the kernel kills this worker for memory, a small sentinel process reports it "
        "on the worker's port for S seconds, so the client's error says so (default "
        f"{sentinel.DEFAULT_TTL_S:.0f}; 0 starts no sentinel)",
    )
    worker.set_defaults(func=cli_worker.run)


def _add_plan_parser(sub: _Subparsers[_Parser]) -> None:
    """Adds the `plan` subcommand (run by `tfpipe.cli_plan.run`).

    Args:
        sub: the subparsers of `build_parser`'s parser.
    """
    plan = sub.add_parser(
        "plan",
        help="profile a saved model and rank stage counts, splits, micro-batches, schedules",
        description=(
            "Load a saved .keras model, profile each layer's forward + backward time on the "
            "first device at every micro-batch size considered (on a random batch of the "
            "model's input shapes and dtypes), predict the step time and per-device memory of "
            "every configuration (stages, split, micro-batches, schedule, recomputation) with "
            "the schedule simulator, and print them ranked (tfpipe.plan)."
        ),
    )
    plan.add_argument("model", metavar="MODEL.keras", help="a model saved with model.save")
    plan.add_argument("--batch", type=_positive_int, required=True, metavar="N",
                      help="training batch size B (samples per step)")
    plan.add_argument(
        "--devices", required=True, metavar="N|NAME,...",
        help="a count N (the first N GPUs, or N logical CPU devices without a GPU) or device "
        "names such as /device:GPU:0,/device:GPU:1",
    )
    plan.add_argument("--memory-budget", default=None, metavar="SIZE",
                      help="bytes per device, such as 2GiB or 512MB; configurations above it "
                      "are marked as not fitting")
    plan.add_argument("--bandwidth", default=None, metavar="SIZE",
                      help="bytes per second between devices, such as 10GB (default: measured "
                      "between the first two devices)")
    plan.add_argument("--plot", default=None, metavar="PATH",
                      help="write the best configuration's predicted timeline as a PNG")
    plan.add_argument("--top", type=_positive_int, default=10, metavar="N",
                      help="rows of the ranked table to print (default 10)")
    plan.add_argument("--repeats", type=_positive_int, default=5, metavar="R",
                      help="timed runs per layer and size; the median is kept (default 5)")
    plan.set_defaults(func=_plan)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `tfpipe` command line; returns the exit status.

    Args:
        argv: the arguments after the program name; defaults to `sys.argv[1:]`.

    Returns:
        0 on success, 2 for a usage error, 1 when an output file cannot be written or a
        worker cannot start. `tfpipe worker` does not return: it ends the process with
        status 0 on SIGTERM or SIGINT.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return int(args.func(args))


def _tfpipe_version() -> str:
    from tfpipe import __version__

    return __version__


def _fail(command: str, message: str, status: int = EXIT_USAGE) -> int:
    print(f"tfpipe {command}: error: {message}", file=sys.stderr)
    return status


def _number(value: float) -> str:
    return f"{value:.6g}"


def _schedule(args: argparse.Namespace) -> int:
    from tfpipe.schedules import DEFAULT_CHUNKS, GENERATORS, default_chunks, get
    from tfpipe.schedules.format import format_schedule
    from tfpipe.schedules.simulate import Costs, peak_in_flight, simulate

    if args.name not in GENERATORS:
        return _fail("schedule", f"unknown schedule {args.name!r}: use one of "
                     f"{', '.join(GENERATORS)}")
    chunks = args.chunks if args.chunks is not None else default_chunks(args.name)
    if chunks != 1 and args.name not in DEFAULT_CHUNKS:
        several = ", ".join(repr(name) for name in DEFAULT_CHUNKS)
        return _fail("schedule", f"--chunks {chunks} needs a schedule of {several}; "
                     f"{args.name!r} runs one stage per device (leave --chunks out)")
    try:
        schedule = get(args.name, args.stages * chunks, args.micro_batches, chunks=chunks)
    except ValueError as err:  # unknown name, chunks a schedule cannot use; ScheduleError too
        return _fail("schedule", str(err).splitlines()[0])
    # Per-stage costs forward 1, backward 2; a rank's v chunks share them (1/v and 2/v each),
    # so step times compare across schedules and the bubble is the same as with Costs(1, 2).
    costs = Costs(forward=1.0 / chunks, backward=2.0 / chunks)
    sim = simulate(schedule, costs)
    pieces = f", {schedule.num_stages} model pieces ({chunks} per rank)" if chunks > 1 else ""
    print(f"schedule {schedule.name!r}: {schedule.num_ranks} stages x "
          f"{schedule.num_micro_batches} micro-batches{pieces}")
    print(format_schedule(schedule))
    print()
    per = f" per stage ({_number(1 / chunks)} and {_number(2 / chunks)} per piece)" if chunks > 1 \
        else " per stage"
    print(f"simulated with forward = 1, backward = 2{per}, no transfer delay:")
    print(f"  step time: {_number(sim.step_time)}")
    print(f"  bubble fraction: {sim.bubble_fraction:.4f} ({100 * sim.bubble_fraction:.1f}% idle)")
    label = "model piece" if chunks > 1 else "stage"
    peaks = ", ".join(str(p) for p in peak_in_flight(schedule))
    print(f"  peak micro-batches in flight per {label}: {peaks}")
    if args.png is not None:
        try:
            from tfpipe.schedules.plot import plot

            path = plot(sim, args.png)
        except ImportError as err:
            return _fail("schedule", f"--png needs matplotlib ({err}); install it with "
                         "pip install 'tfpipe[plot]'", EXIT_FAILURE)
        except OSError as err:
            return _fail("schedule", f"cannot write --png {args.png!r}: {err}", EXIT_FAILURE)
        print(f"wrote {path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    # Lazy: TensorFlow, Keras and NumPy load only when a command needs them (`tfpipe schedule`
    # starts fast).
    import keras
    import numpy as np
    import tensorflow as tf

    build = tf.sysconfig.get_build_info()
    cuda = "CUDA build" if build.get("is_cuda_build") else "no CUDA"
    rows = [
        ("tfpipe", _tfpipe_version()),
        ("TensorFlow", f"{tf.__version__} ({cuda})"),
        ("Keras", f"{keras.__version__} (backend {keras.backend.backend()})"),
        ("NumPy", np.__version__),
        ("Python", f"{platform.python_version()} ({platform.python_implementation()}, "
                   f"{sys.executable})"),
        ("platform", platform.platform()),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    physical = tf.config.list_physical_devices()
    # Listing logical devices starts TensorFlow's runtime; without memory growth that would
    # reserve most of each GPU's memory for this short-lived process.
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):
            pass
    logical = tf.config.list_logical_devices()
    print(f"physical devices ({len(physical)}):")
    for d in physical:
        print(f"  {d.name}  ({d.device_type})")
    print(f"logical devices ({len(logical)}):")
    for d in logical:
        print(f"  {d.name}  ({d.device_type})")
    if not tf.config.list_physical_devices("GPU"):
        print("no GPU visible: call tfpipe.configure_cpu_devices(n) first thing in a script to "
              "split the CPU into n logical devices (placement and correctness, not speed)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Runs `tfpipe plan` (`tfpipe.cli_plan.run`) and prints its error, if any, as one line."""
    try:
        return cli_plan.run(args)
    except cli_plan.PlanError as err:
        return _fail("plan", str(err), EXIT_USAGE if err.usage else EXIT_FAILURE)
