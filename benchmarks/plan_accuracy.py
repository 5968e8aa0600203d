"""Issue #7 (planner): `tfpipe.plan`'s predicted step times against measured ones, on workers.

The setup is target 3's (`benchmarks/workers.py`): two one-thread `python -m tfpipe worker`
processes on free loopback ports, each on a core of its own (`--pin true`, the default), and
one client process connected with `tfpipe.cluster(..., threads=1)`; the peer model,
8 x Dense(1024, relu) + Dense(10), batch 256 or `--batch N`, SGD. The client:

1. plans: `tfpipe.plan(model, x, devices=<the two workers' CPUs>, parallel=True)`, x one batch
   (the layers are profiled on worker 0; the two workers are separate processes, so they
   compute at the same time), and prints the plan's table;
2. measures, with tfpipe on the workers, the plan's top 3 configurations and the
   configurations of target 3's table given by `--extra` (default all of them: 1 stage
   M=1, the baseline; 2-stage GPipe and 1F1B with M = 1, 2, 4, 8, 16), each with the
   planner's own split
   (`PlanConfig.kwargs()`): for an `--extra` configuration, the best-ranked configuration
   of the plan with that stage count, schedule and M, without recomputation;
3. times fixed costs per step (as `workers.py`'s probes do): one empty function call that
   touches both workers (`dispatch`; the planner measures its own and adds it to every
   step), feeding one batch x 1024 batch from the client to worker 0 (`feed`, left out of the
   cost model), and a call on worker 0 that fetches 4 scalars (`profile-call`, what each
   timed profiling call pays and the profiler's loop difference removes).

Timing is `workers.py`'s: every configuration is visited once per round, in an order
rotated from round to round, for `--rounds` rounds; each visit runs `--warmup` untimed steps
(the first visit's also trace), then `--runs` timed runs of `--steps` steps; figures are
medians over all timed runs. The table gives per configuration the predicted and measured
ms per step, measured / predicted, whether the prediction is within 20% (`--tolerance`), and
the line after it whether `plan.best` measured at least as fast as every other configuration
measured (within the noise: `--tie`, default 3%).

Worker and client processes are always ended at the end, also on an error, SIGTERM or
Ctrl-C; every wait on them is bounded.

Usage:
    python -m benchmarks.plan_accuracy [--quick] [--rounds 3] [--runs 2] [--steps 10]
        [--extra 1:gpipe:1,2:1f1b:2,...] [--repeats 5]
        [--json out/plan_accuracy.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the parent imports tfpipe, so TensorFlow
if not __package__:  # `python benchmarks/plan_accuracy.py`: import its folder as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.speed_table import (
    add_timing_args,
    check_timing,
    load_line,
    median,
    quick_timing,
    write_json,
)
from benchmarks.workers import ClientProcess, record_end
from tfpipe import processes
from tfpipe.processes import WorkerPool

TOP = 3
TABLE = ",".join(["1:gpipe:1"] + [f"2:{s}:{m}" for s in ("gpipe", "1f1b")
                                   for m in (1, 2, 4, 8, 16)])
"""Target 3's table (`workers.py`): the 1-worker baseline, 2-stage GPipe and 1F1B, M = 1-16."""


# the parent: processes ----------------------------------------------------------------------


class Client(ClientProcess):
    """The client process (`python -m benchmarks.plan_accuracy --client ...`)."""

    def __init__(self, args: argparse.Namespace, addresses: list[str], pool: WorkerPool) -> None:
        cmd = [sys.executable, "-m", "benchmarks.plan_accuracy", "--client", ",".join(addresses),
               "--extra", args.extra, "--steps", str(args.steps), "--runs", str(args.runs),
               "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "--micro-batches", args.micro_batches, "--batch", str(args.batch)]
        super().__init__(cmd, pool)


def parent(args: argparse.Namespace) -> None:
    """Starts the workers and the client, plans, runs the rounds, prints and writes results."""
    processes.raise_on_signals()  # so the finally below ends the children
    logs = Path(tempfile.mkdtemp(prefix="tfpipe-plan-bench-"))
    pool = WorkerPool(logs, threads=1, pin=args.pin == "true")
    report: dict[str, Any] = {"args": vars(args), "load_before": os.getloadavg()}
    times: dict[str, list[float]] = {}
    try:
        addresses, _ = pool.start(2)
        client = Client(args, addresses, pool)
        t0 = time.monotonic()
        report["plan"] = client.request("plan", processes.READY_TIMEOUT_S + args.round_timeout)
        print(f"[plan] {time.monotonic() - t0:.0f} s; workers {addresses}, logs in {logs}",
              flush=True)
        print(report["plan"]["table"], flush=True)
        for r in range(args.rounds):
            t0 = time.monotonic()
            for label, ms in client.request(f"round {r}", args.round_timeout).items():
                times.setdefault(label, []).extend(ms)
            print(f"[round {r + 1}/{args.rounds}] {time.monotonic() - t0:.0f} s, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
        report["traces"] = client.request("traces", 60)
        client.quit(60)
    finally:
        pool.stop_all()
    record_end(report, pool)
    report["times_ms"] = times
    table = compare(report["plan"]["configs"], times, args.tolerance)
    report["rows"] = table
    report["best"] = verdict(table, args.tie)
    print("\n".join(format_table(table, args.tolerance)))
    print(report["best"]["line"])
    print(f"[probes] fixed costs per step: one empty call on both workers "
          f"{median(times['probe:dispatch']):.2f} ms (the plan's own measurement: "
          f"{report['plan']['step_overhead_ms']}); feeding a {args.batch}x1024 batch to "
          f"worker 0 {median(times['probe:feed']):.2f} ms (not in the cost model); a "
          f"profiling call's round trip "
          f"per layer call (an empty call on worker 0 and 4 fetched scalars) "
          f"{median(times['probe:profile-call']):.2f} ms; a hop between the workers, as the "
          f"plan measured it: {report['plan']['latency_ms']} ms + bytes at "
          f"{report['plan']['bandwidth'] / 1e9:.3g} GB/s")
    print(load_line(report["load_before"], report["load_after"]))
    write_json(args.json, report)


def compare(configs: list[dict[str, Any]], times: dict[str, list[float]],
            tolerance: float) -> list[dict[str, Any]]:
    """One row per measured configuration: predicted and measured ms, ratio, within tolerance.

    Args:
        configs: the client's `plan` answer's configurations (label, rank, predicted_ms, ...).
        times: label -> ms per step of each timed run.
        tolerance: the allowed relative miss, 0.2 for 20%.
    """
    out = []
    for c in configs:
        runs = times.get(c["label"], [])
        measured = median(runs)
        ratio = measured / c["predicted_ms"]
        out.append({
            **c, "measured_ms": measured, "runs": len(runs),
            "spread": max(runs) / min(runs) - 1 if runs else float("nan"),
            "ratio": ratio, "within": abs(ratio - 1) <= tolerance,
        })
    return out


def verdict(table: list[dict[str, Any]], tie: float) -> dict[str, Any]:
    """Whether the plan's best (rank 1) measured at least as fast as every other row (within
    `tie`, a relative margin for noise)."""
    best = next(r for r in table if r["rank"] == 1)
    fastest = min(table, key=lambda r: r["measured_ms"])
    ok = best["measured_ms"] <= fastest["measured_ms"] * (1 + tie)
    line = (f"[best] plan.best ({best['label']}) measured {best['measured_ms']:.1f} ms; the "
            f"fastest measured is {fastest['label']} at {fastest['measured_ms']:.1f} ms: "
            + ("plan.best is the fastest" if best is fastest else
               f"plan.best is {100 * (best['measured_ms'] / fastest['measured_ms'] - 1):.1f}% "
               f"slower ({'within' if ok else 'beyond'} the {100 * tie:.0f}% noise margin)"))
    return {"label": best["label"], "fastest": fastest["label"], "ok": ok, "line": line}


def format_table(table: list[dict[str, Any]], tolerance: float) -> list[str]:
    lines = [f"{'rank':>4} {'config':<34} {'from':<6} {'predicted':>9} {'measured':>8} "
             f"{'spread':>6} {'meas/pred':>9} {f'within {100 * tolerance:.0f}%':>10}"]
    for r in table:
        lines.append(
            f"{r['rank']:>4} {r['label']:<34} {r['source']:<6} {r['predicted_ms']:9.1f} "
            f"{r['measured_ms']:8.1f} {100 * r['spread']:5.0f}% {r['ratio']:9.2f} "
            f"{'yes' if r['within'] else 'no':>10}")
    return lines


# the client -----------------------------------------------------------------------------------


def label_of(c: Any) -> str:
    """`"K=2 1f1b M=4 [4,5]"`, plus the recompute mode and chunks when not the default."""
    sched = c.schedule + (f" x{c.chunks}" if c.chunks > 1 else "")
    text = f"K={c.stages} {sched} M={c.micro_batches} [{','.join(map(str, c.balance))}]"
    return text + (f" rc={c.recompute}" if c.recompute != "never" else "")


def pick(plan: Any, extra: str) -> list[tuple[str, Any]]:
    """The top configurations, then those of `extra` ("K:schedule:M,...") not already in."""
    chosen: list[tuple[str, Any]] = [("top", c) for c in plan.configs[:TOP]]
    for spec in filter(None, extra.split(",")):
        k, schedule, m = spec.split(":")
        match = next((c for c in plan.configs if c.stages == int(k) and c.micro_batches == int(m)
                      and c.schedule == schedule and c.recompute == "never"), None)
        if match is None:
            raise SystemExit(f"--extra {spec}: no such configuration in the plan")
        if all(match.kwargs() != c.kwargs() for _, c in chosen):
            chosen.append(("table", match))
    return chosen


def client(args: argparse.Namespace) -> None:
    """The client process: connects, plans, builds the chosen configurations, answers
    commands on stdin."""
    import tfpipe

    devices = tfpipe.cluster(args.client, threads=1, timeout_s=60)  # before TF starts
    import tensorflow as tf

    from benchmarks.common import compiled, data_for
    from benchmarks.workers import Probe, Runner, _reduce, serve, traces, visit_round
    from tfpipe.measure import dispatch_function

    data = data_for("mlp", args.batch, 8)
    x = tf.constant(next(iter(data))[0])  # on the client
    runners: dict[str, Any] = {}
    pipes: dict[str, Any] = {}

    def plan_command(_: list[str]) -> dict[str, Any]:
        t0 = time.perf_counter()
        plan = tfpipe.plan(compiled("mlp"), x, devices=devices, parallel=True,
                           repeats=args.repeats,
                           micro_batches=[int(m) for m in args.micro_batches.split(",")])
        took = time.perf_counter() - t0
        configs = []
        for source, c in pick(plan, args.extra):
            label = label_of(c)
            pipes[label] = tfpipe.Pipeline(compiled("mlp"), **c.kwargs(),
                                           devices=list(c.devices))
            runners[label] = Runner(
                lambda n, cb, p=pipes[label]: p.fit(data, steps_per_epoch=n, callbacks=[cb],
                                                   epochs=1, verbose=0))
            configs.append({"label": label, "source": source,
                            "rank": plan.configs.index(c) + 1,
                            "predicted_ms": 1e3 * c.step_time, "kwargs": c.kwargs(),
                            "devices": list(c.devices), "bubble": c.bubble})
        runners["probe:dispatch"] = Probe(dispatch_function(devices[:2]))
        runners["probe:feed"] = Probe(_reduce(devices[0], tf, x),
                                      _reduce(devices[0], tf, tf.constant(x[:1])))
        runners["probe:profile-call"] = Probe(_fetched(devices[0], tf))
        prof = plan.profile
        return {
            "seconds": took, "table": plan.table(top=10), "configs": configs,
            "devices": devices, "profile_device": prof.device,
            "profile_ms": {str(s): [1e3 * t for t in ts] for s, ts in prof.seconds},
            "bandwidth": plan.cost_model.bandwidth, "parallel": plan.cost_model.parallel,
            "step_overhead_ms": [round(1e3 * t, 2) for t in plan.cost_model.step_overhead],
            "latency_ms": round(1e3 * plan.cost_model.latency, 3),
        }

    serve({"plan": plan_command,
           "round": lambda command: visit_round(runners, int(command[1]), args),
           "traces": lambda _: traces(pipes)})


def _fetched(d0: str, tf: Any) -> Any:
    """What the profiler pays per layer call besides the layer: one function call on `d0`
    and fetching its 4 scalars (a Dense layer's: the output sum and one per gradient)."""
    @tf.function(autograph=False)
    def scalars() -> Any:
        with tf.device(d0):
            one = tf.constant(1.0)
            return [one + i for i in range(4)]

    return lambda: [t.numpy() for t in scalars()]


# entry point --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_args(parser, "a smoke run: M in {1, 2, 4}, 2 rounds of 1 run of 2 steps",
                    "out/plan_accuracy.json")
    parser.add_argument("--repeats", type=int, default=5,
                        help="tfpipe.plan(repeats=): timed runs per layer call and size")
    parser.add_argument("--micro-batches", default="1,2,4,8,16,32",
                        help="tfpipe.plan(micro_batches=) (default the planner's; 1,2,4 quick)")
    parser.add_argument("--extra", default=TABLE,
                        help="configurations of target 3's table to measure too, K:schedule:M "
                        "(default all of them; 1:gpipe:1,2:1f1b:1,2:1f1b:2,2:1f1b:4 quick)")
    parser.add_argument("--tolerance", type=float, default=0.2,
                        help="allowed |measured / predicted - 1|")
    parser.add_argument("--tie", type=float, default=0.03,
                        help="relative margin within which plan.best counts as the fastest")
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick_timing(args)
    if args.quick:
        args.repeats = 1
        if args.micro_batches == parser.get_default("micro_batches"):
            args.micro_batches = "1,2,4"
        if args.extra == TABLE:
            args.extra = "1:gpipe:1,2:1f1b:1,2:1f1b:2,2:1f1b:4"
    check_timing(parser, args)
    if args.client:
        client(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
