"""Issue #6 / #7: a 2-stage pipeline on two one-thread `tfpipe worker` processes against one.

The script starts two `python -m tfpipe worker` processes on free loopback ports and one
client process that connects with `tfpipe.cluster(..., threads=1)` (thread limits of a
worker are the client's, so each worker runs on one thread), then times, on the peer model
(8 x Dense(1024, relu) + Dense(10), batch 256 or `--batch N`, SGD):

- `baseline`: tfpipe with 1 stage, M = 1 on worker 0 (the whole model on one process);
- `model.fit`: plain Keras `model.fit` with its step placed on worker 0;
- `sequential M=m`: tfpipe, 1 stage on worker 0, M micro-batches in sequence;
- `gpipe M=m`, `1f1b M=m`: tfpipe, 2 stages on workers 0 and 1 (`--rank-loops true`: the
  pipelines of M > 1 run as rank loops, `rank_loops=True`; `--rank-loops both`: also
  `gpipe+loops M=m`, `1f1b+loops M=m` rows, the same pipelines as rank loops, in the same
  rounds, each against the same unrolled `sequential M=m`);
- `comm M=m`: the step's 2 M boundary hops alone: a function that sends a
  (batch/M) x 1024 float tensor worker 0 -> 1 -> 0 ... M times (each hop waits for the one
  before), minus the same function kept on worker 0 (`tfpipe.measure.hop_function`, the
  planner's transfer probe); an upper bound on what transfers add
  to a step (in a pipeline they can overlap with compute);
- CPU (Linux): for each timed configuration, the cores each worker and the client kept busy
  (CPU seconds from /proc over the timed runs' wall seconds) and the workers' CPU per step,
  which tells idle time (a worker waiting) from contention (the same work taking longer);
- probes: the time of one empty function call that touches both workers (`dispatch`:
  `tfpipe.measure.dispatch_function`, what the planner times), the
  extra time of feeding one batch x 1024 batch from the client to worker 0 (`feed`), and
  whether a worker sends a tensor while it computes something else (`chain`, `overlap`:
  see `_overlap`);
- TensorFlow alone (`tf M=m`, printed as `[tf alone]`): the model's forward, loss and
  backward on worker 0 in one function, whole and in M pieces, no engine and no optimizer
  (`_tf_pieces`): what TensorFlow's kernels charge for M pieces, and so the speedup
  2M/(M+1) / that cost which no engine on these kernels can pass.

Method: every configuration is visited once per round, in a rotated order, for `--rounds`
rounds (A B C ... B C A ...); each visit runs `--warmup` untimed steps (the first visit's
also trace), then `--runs` timed runs of `--steps` steps. Figures are medians over all timed
runs (rounds x runs). `--peer` also runs PyTorch's `torch.distributed.pipelining`
(benchmarks/peer_torch.py) in every round, after tfpipe's configurations, so both systems see
the same machine state. `--timeline` adds tfpipe's measured timelines (`profile=True`) of each
configuration, for where the time goes, and `[stage bound]`, the step no engine on these
kernels beats (`speed_table.stage_bounds`). The machine's load (`os.getloadavg`) is recorded
before and after; on a shared machine `--quiet 0.3` makes each visit first wait (at most
`--quiet-wait` seconds) until the CPUs are less than 30% busy, and records what it saw.

One-core workers: each worker runs on a core of its own (`tfpipe worker --cpus C`, the
baseline's and the sequential rows' worker 0 too; `--pin false` leaves them unpinned), with
one intra-op thread and, from `tfpipe.cluster(threads=1)`, two inter-op threads: the second
sends a finished stage's output while the first computes (with one, TensorFlow's executor
queued the send behind the next compute; see docs/benchmarks.md). `--timeline`'s spans come from
`profile=True`, which keeps each device's actions in schedule order and the devices
independent (see tfpipe/executor/profiling.py), so ranks overlap there as they do unprofiled.

Worker and client processes are always ended at the end, also on an error, SIGTERM or
Ctrl-C; every wait on them is bounded.

Usage:
    python -m benchmarks.workers [--quick] [--batch 256] [--rounds 3] [--runs 2] [--steps 10]
        [--rank-loops false|true|both] [--micro-batches 1,2,4,8,16] [--schedules gpipe,1f1b]
        [--peer] [--timeline] [--pin true|false] [--quiet 0.3 --quiet-wait 30]
        [--json out/workers.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the parent imports tfpipe, so TensorFlow
if not __package__:  # `python benchmarks/workers.py`: import its folder as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.speed_table import (
    add_timing_args,
    bound,
    check_timing,
    format_rows,
    load_line,
    median,
    quick_timing,
    rows,
    split_label,
    stage_bounds,
    summary,
    wait_quiet,
    write_json,
)
from tfpipe import processes
from tfpipe.processes import ROOT, Lines, ProcessGroup, WorkerPool
from tfpipe.schedules.timeline import rank_busy

WIDTH = 1024


# the parent: processes ----------------------------------------------------------------------


class ClientProcess:
    """A benchmark's client process (`python -m <module> --client ...`, started in `group`),
    driven by commands on its stdin; other lines it prints are echoed after `echo_prefix`."""

    def __init__(self, cmd: list[str], group: ProcessGroup, echo_prefix: str = "") -> None:
        self.echo_prefix = echo_prefix
        self.proc = group.spawn(cmd, "client.log", cwd=ROOT, stdin=True)
        self.lines = Lines(self.proc, group.dir / "client.log")

    def request(self, command: str, timeout_s: float) -> Any:
        """Sends one command; returns the JSON of its `RESULT` line."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.lines.next(max(deadline - time.monotonic(), 1.0), f"client {command!r}")
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
            print(f"{self.echo_prefix}{line}", flush=True)

    def quit(self, timeout_s: float) -> None:
        """Asks the client to end, and waits for it (bounded)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout_s)


class Client(ClientProcess):
    """The client process (`python -m benchmarks.workers --client ...`)."""

    def __init__(self, args: argparse.Namespace, addresses: list[str], pool: WorkerPool) -> None:
        cmd = [sys.executable, "-m", "benchmarks.workers", "--client", ",".join(addresses),
               "--micro-batches", args.micro_batches, "--schedules", args.schedules,
               "--steps", str(args.steps), "--runs", str(args.runs), "--warmup", str(args.warmup),
               "--quiet-wait", str(args.quiet_wait),
               "--worker-pids", ",".join(map(str, pool.pids)), "--batch", str(args.batch),
               "--rank-loops", args.rank_loops]
        if args.quiet is not None:
            cmd += ["--quiet", str(args.quiet)]
        super().__init__(cmd, pool, echo_prefix="  [client] ")


def parent(args: argparse.Namespace) -> None:
    """Starts the workers and the client, runs the rounds, prints and writes the results."""
    processes.raise_on_signals()  # SIGTERM and SIGINT: the finally below ends the children
    logs = Path(tempfile.mkdtemp(prefix="tfpipe-workers-bench-"))
    pool = WorkerPool(logs, pin=args.pin == "true")
    peer = None
    if args.peer:
        from benchmarks import peer_torch as peer  # optional: needs torch

        peer.check_torch()
    report: dict[str, Any] = {"args": vars(args), "load_before": os.getloadavg()}
    times: dict[str, dict[str, list[float]]] = {"tfpipe": {}, "torch": {}}
    try:
        addresses, _ = pool.start(2)
        report["worker_cores"] = [sorted(os.sched_getaffinity(pid)) for pid in pool.pids]
        client = Client(args, addresses, pool)
        report["setup"] = client.request("setup", processes.READY_TIMEOUT_S + 300)
        print(f"[workers] {addresses}, stages {report['setup']['stage_layers']}, "
              f"logs in {logs}", flush=True)
        busy: list[Any] = []  # torch: CPUs' busy fraction before each part of each round
        for r in range(args.rounds):
            t0 = time.monotonic()
            for label, ms in client.request(f"round {r}", args.round_timeout).items():
                times["tfpipe"].setdefault(label, []).extend(ms)
            took = time.monotonic() - t0
            if peer is not None:
                t0 = time.monotonic()
                for label, ms in peer.torch_round(args, r, logs, busy).items():
                    times["torch"].setdefault(label, []).extend(ms)
                took_torch = time.monotonic() - t0
                print(f"[round {r + 1}/{args.rounds}] tfpipe {took:.0f} s, torch "
                      f"{took_torch:.0f} s, load {os.getloadavg()[0]:.2f}", flush=True)
            else:
                print(f"[round {r + 1}/{args.rounds}] {took:.0f} s, "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
        report["cpu"] = client.request("cpu", 60)
        if args.timeline:
            report["timeline"] = client.request("timeline", args.round_timeout)
        report["traces"] = client.request("traces", 60)
        client.quit(60)
    finally:
        pool.stop_all()
    record_end(report, pool)
    report["busy"] = busy
    report["times_ms"] = times
    table = rows("tfpipe", times["tfpipe"]) + (rows("torch", times["torch"]) if peer else [])
    report["rows"] = table
    print("\n".join(format_rows(table)))
    probes = times["tfpipe"]
    chain, overlap = median(probes["probe:chain"]), median(probes["probe:overlap"])
    print(f"[probes] one empty call on both workers {median(probes['probe:dispatch']):.2f} ms; "
          f"feeding a {args.batch}x{WIDTH} batch to worker 0 adds "
          f"{median(probes['probe:feed']):.2f} ms; a tensor sent by a busy worker: "
          f"{overlap:.1f} ms = {overlap / chain:.2f} chains "
          f"of {chain:.1f} ms (2 = sent while it computes, 3 = only once it is idle)")
    _print_tf_alone(probes)
    _print_cpu(report["cpu"], times["tfpipe"])
    print("[summary] " + summary([r for r in table if r["system"] == "tfpipe"]))
    if peer is not None:
        print("[summary] " + summary([r for r in table if r["system"] == "torch"]))
    if args.timeline:
        _print_timelines(report["timeline"])
        report["stage_bounds"] = stage_bounds(report["timeline"], times["tfpipe"])
        _print_stage_bounds(report["stage_bounds"])
    print(load_line(report["load_before"], report["load_after"]))
    if args.quiet is not None:
        seen = [b for k, v in times["tfpipe"].items() if k.startswith("busy:") for b in v]
        seen += [b for k, v in times["torch"].items() if k.startswith("busy:") for b in v]
        seen += [b for *_, b in busy]
        print(f"[quiet] before each visit the CPUs were {100 * min(seen):.0f}-"
              f"{100 * max(seen):.0f}% busy (median {100 * median(seen):.0f}%; limit "
              f"{100 * args.quiet:.0f}%, waits of at most {args.quiet_wait:.0f} s)")
    write_json(args.json, report)


def _print_tf_alone(probes: dict[str, list[float]]) -> None:
    """The `probe:tf` rows: TensorFlow's own cost of M pieces, and the bound it leaves."""
    whole = median(probes["probe:tf M=1"])
    parts = []
    for label in sorted((k for k in probes if k.startswith("probe:tf M=")),
                        key=lambda k: int(k.split("=")[1])):
        m = int(label.split("=")[1])
        if m > 1:
            cost = median(probes[label]) / whole
            parts.append(f"M={m}: {cost:.3f}x, bound {bound(m) / cost:.2f}")
    print(f"[tf alone] the model's forward and backward on worker 0 in TensorFlow alone "
          f"(no engine, no optimizer), {whole:.1f} ms whole; M pieces cost, and the speedup "
          f"over the whole batch that leaves at most (2M/(M+1) / cost): {'; '.join(parts)}")


def _print_cpu(cpu: dict[str, list[list[float]]], times: dict[str, list[float]]) -> None:
    """The cores each process kept busy while a configuration was timed (medians over its
    visits), and the workers' CPU per step: equal CPU per step with fewer cores busy is
    waiting, more CPU per step is contention or extra work."""
    if not cpu or all(math.isnan(c) for visits in cpu.values() for v in visits for c in v):
        print("[cpu] not measured (needs Linux /proc)")
        return
    print("[cpu] cores busy over the timed runs (CPU seconds / wall seconds; medians over the "
          "visits): worker 0, worker 1, client; work = the two workers' CPU ms per step")
    print(f"{'config':<16} {'w0':>5} {'w1':>5} {'client':>6} {'work ms':>8}")
    for label, visits in cpu.items():
        cores = [median([v[i] for v in visits]) for i in range(3)]
        work = (cores[0] + cores[1]) * median(times[label])
        print(f"{label:<16} {cores[0]:5.2f} {cores[1]:5.2f} {cores[2]:6.2f} {work:8.1f}")


def _print_timelines(timelines: list[dict[str, Any]]) -> None:
    print("[timeline] profiled steps (profile=True), ms: wall = time per step seen by "
          "Keras; lead = Keras's batch start to the first action; span = first action start to "
          "last action end; tail = last action end to Keras's batch end; busy = sum of a "
          "rank's actions;"
          " F/B = mean per micro-batch per stage; hop = mean gap between a stage's action and "
          "the next stage's one on the same micro-batch; ideal = the schedule's span with these "
          "F/B and free transfers (tfpipe.schedules.simulate); medians over the profiled steps")
    print(f"{'config':<24} {'wall':>6} {'lead':>5} {'span':>6} {'tail':>5} {'ideal':>6} "
          f"{'busy0':>6} {'busy1':>6} {'F0':>5} {'F1':>5} {'B0':>5} {'B1':>5} {'hop':>5}")
    for t in timelines:
        f, b, busy = t["forward_ms"], t["backward_ms"], t["busy_ms"]
        two = len(busy) > 1
        print(f"{t['config']:<24} {t['wall_ms']:6.1f} {t['lead_ms']:5.1f} {t['span_ms']:6.1f} "
              f"{t['tail_ms']:5.1f} {t['predicted_span_ms']:6.1f} {busy[0]:6.1f} "
              f"{busy[1] if two else 0:6.1f} {f[0]:5.2f} {f[1] if two else 0:5.2f} "
              f"{b[0]:5.2f} {b[1] if two else 0:5.2f} {t['hop_ms'] or 0:5.2f}")


def _print_stage_bounds(bounds: list[dict[str, Any]]) -> None:
    print("[stage bound] what these stage costs leave to any engine (speed_table.stage_bounds): "
          "the schedule's span with the actions' costs on one worker (the `, 1 worker` "
          "timeline: no transfers) and free transfers, scaled by the sequential step's "
          "unprofiled / profiled time; no fixed costs per step")
    print(f"{'config':<10} {'M':>3} {'scale':>5} {'bound ms':>8} {'measured':>8} {'of bound':>8} "
          f"{'speedup':>7} {'at most':>7} {'eff/seq at most':>15}")
    for b in bounds:
        print(f"{b['config']:<10} {b['M']:>3} {b['scale']:5.2f} {b['bound_ms']:8.1f} "
              f"{b['measured_ms']:8.1f} {b['of_bound']:8.2f} {b['speedup']:7.2f} "
              f"{b['speedup_bound']:7.2f} {b['efficiency_vs_sequential_bound']:15.2f}")


# the client -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far, all its threads (Linux /proc); NaN
    where /proc cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Runner:
    """Times one configuration: `run(n, callback)` runs n training steps.

    `pids` (worker 0, worker 1, the client): the processes whose CPU seconds over the timed
    runs `visit` also records, in `cpu` (cores busy, one list per visit).
    """

    def __init__(self, run: Callable[[int, Any], None], pids: list[int] | None = None) -> None:
        self.run, self.pids = run, pids or []
        self.cpu: list[list[float]] = []

    def visit(self, warmup: int, runs: int, steps: int) -> list[float]:
        """`warmup` untimed steps, then ms per step of each of `runs` runs of `steps` steps."""
        import keras

        stamps: list[float] = []
        cpu: list[list[float]] = []
        pids, first, last = self.pids, warmup, warmup + runs * steps

        class Stamps(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                stamps.append(time.perf_counter())
                if len(stamps) in (first, last):
                    cpu.append([cpu_seconds(pid) for pid in pids])

        self.run(last, Stamps())
        if pids:
            wall = stamps[-1] - stamps[first - 1]
            self.cpu.append([(b - a) / wall for a, b in zip(cpu[0], cpu[1])])
        w = warmup - 1
        return [1e3 * (stamps[w + (r + 1) * steps] - stamps[w + r * steps]) / steps
                for r in range(runs)]


class Probe:
    """Times a function call: ms per call of each run, or differences of two functions."""

    def __init__(self, fn: Callable[[], Any], minus: Callable[[], Any] | None = None) -> None:
        self.fn, self.minus = fn, minus

    def visit(self, warmup: int, runs: int, steps: int) -> list[float]:
        out = []
        for _ in range(runs):
            t = [self._time(f, warmup, steps) for f in (self.fn, self.minus) if f is not None]
            out.append(t[0] - (t[1] if len(t) > 1 else 0.0))
        return out

    @staticmethod
    def _time(fn: Callable[[], Any], warmup: int, steps: int) -> float:
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        return 1e3 * (time.perf_counter() - start) / steps


def client(args: argparse.Namespace) -> None:
    """The client process: connects, builds every configuration, answers commands on stdin."""
    import tfpipe

    devices = tfpipe.cluster(args.client, threads=1, timeout_s=60)  # before TF starts
    import keras
    import tensorflow as tf

    from benchmarks.common import compiled, data_for
    from tfpipe.measure import dispatch_function, hop_function

    d0, d1 = devices
    ms = [int(m) for m in args.micro_batches.split(",")]
    schedules = [s for s in args.schedules.split(",") if s]
    data = data_for("mlp", args.batch, 8)
    fit = dict(epochs=1, verbose=0)

    def piped(stages: int, m: int, schedule: str = "gpipe", profile: bool = False,
              one_worker: bool = False, loops: bool | str = False) -> Any:
        devices = [d0, d0 if one_worker else d1][:stages]
        return tfpipe.Pipeline(compiled("mlp"), stages=stages, devices=devices,
                               micro_batches=m, schedule=schedule, profile=profile,
                               rank_loops=loops)

    def fitting(pipe: Any) -> Callable[[int, Any], None]:
        return lambda n, cb: pipe.fit(data, steps_per_epoch=n, callbacks=[cb], **fit)

    pids = [int(p) for p in args.worker_pids.split(",") if p][:2] + [os.getpid()]
    pipes: dict[str, Any] = {"baseline": piped(1, 1)}
    runners: dict[str, Any] = {"baseline": Runner(fitting(pipes["baseline"]), pids)}
    plain = _plain_on(d0, compiled, tf)
    runners["model.fit"] = Runner(
        lambda n, cb: plain.fit(data, steps_per_epoch=n, callbacks=[cb], **fit), pids)
    for m in ms:
        labels = ([f"sequential M={m}"] if m > 1 else []) + [f"{s} M={m}" for s in schedules]
        if args.rank_loops in ("both", "steady") and m > 1:
            kind = "loops" if args.rank_loops == "both" else "steady"
            labels += [f"{s}+{kind} M={m}" for s in schedules]
        for label in labels:
            schedule, _, suffix = split_label(label)[0].partition("+")
            loops: bool | str = "steady" if suffix == "steady" else (
                suffix == "loops" or (args.rank_loops == "true" and m > 1))
            one = schedule == "sequential"  # one stage: its M micro-batches in sequence
            pipes[label] = piped(1 if one else 2, m, "gpipe" if one else schedule, loops=loops)
            runners[label] = Runner(fitting(pipes[label]), pids)
        # the step's 2 M boundary hops (activations there, gradients back), minus the adds
        hop = (args.batch // m, WIDTH)
        runners[f"comm M={m}"] = Probe(hop_function(d0, d1, hop, 2 * m),
                                       hop_function(d0, d0, hop, 2 * m))
    with tf.device(d0):  # one copy of a batch on worker 0, read by every tf-alone probe
        on_d0 = [tf.Variable(t) for t in next(iter(data))]
    for m in sorted({1, *ms}):
        runners[f"probe:tf M={m}"] = Probe(_tf_pieces(plain, d0, on_d0, m, tf))
    runners["probe:dispatch"] = Probe(dispatch_function([d0, d1]))
    x = tf.constant(next(iter(data))[0])  # on the client
    small = tf.constant(x[:1])
    runners["probe:feed"] = Probe(_reduce(d0, tf, x), _reduce(d0, tf, small))
    chain, overlap = _overlap(d0, d1, tf, args.batch)
    runners["probe:chain"] = Probe(chain)
    runners["probe:overlap"] = Probe(overlap)

    pipe2 = pipes[f"{schedules[0]} M={ms[0]}"]
    setup = {
        "devices": devices,
        "stage_layers": [[layer.name for layer in st.layers] for st in pipe2.stages],
        "stage_params": [st.num_params for st in pipe2.stages],
        "model_fit_kernel_device": plain.layers[0].kernel.value.device,
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "rank_loops": sorted(label for label, p in pipes.items() if p.executor.loops),
    }
    serve({
        "setup": lambda _: setup,
        "round": lambda command: visit_round(runners, int(command[1]), args),
        "cpu": lambda _: {label: r.cpu for label, r in runners.items()
                          if isinstance(r, Runner) and r.cpu},
        "traces": lambda _: traces(pipes),
        # per M: 1 stage; 2 stages both on worker 0 (the split without a second process);
        # 2 stages on the two workers
        "timeline": lambda _: [_timeline(piped, data, k, m, s, args, one) for m in ms
                               for k, s, one in [(1, "gpipe", False), (2, schedules[-1], True)]
                               + [(2, s, False) for s in schedules]],
    })


def serve(handlers: dict[str, Callable[[list[str]], Any]]) -> None:
    """A client's loop: each line on stdin is a command; the handler named by its first word
    gets its words, and what it returns is printed as one `RESULT <json>` line (what
    `ClientProcess.request` reads). Any other command (`quit`), or stdin closing, ends it."""
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] not in handlers:
            break
        print("RESULT " + json.dumps(handlers[command[0]](command)), flush=True)


def visit_round(runners: dict[str, Any], r: int, args: argparse.Namespace) -> dict[str, Any]:
    """Round `r`: each runner visited once (ms per run), in an order rotated from round to
    round; with `args.quiet` set, each visit first waits for a quiet machine (`busy:<label>`
    records what it saw)."""
    labels = list(runners)
    k = r % len(labels)
    quiet = getattr(args, "quiet", None)
    out: dict[str, Any] = {}
    for label in labels[k:] + labels[:k]:
        if quiet is not None:
            out[f"busy:{label}"] = [wait_quiet(quiet, args.quiet_wait)]
        out[label] = runners[label].visit(args.warmup, args.runs, args.steps)
    return out


def traces(pipes: dict[str, Any]) -> dict[str, Any]:
    """How often each pipeline's steps were traced (each once, in its first visit)."""
    return {label: dict(p.executor.traces) for label, p in pipes.items()}


def record_end(report: dict[str, Any], pool: WorkerPool) -> None:
    """Adds what the parent records after its workers ended: their pids and exit statuses,
    and the machine's load."""
    report["processes"] = {"pids": pool.pids,
                           "exit_status": [p.returncode for p in pool.processes]}
    report["load_after"] = os.getloadavg()


def _plain_on(device: str, compiled: Callable[..., Any], tf: Any) -> Any:
    """A compiled model whose variables, optimizer and training step are all on `device`,
    with the data iterator on the client as for tfpipe: plain Keras, step placed there."""
    with tf.device(device):
        model = compiled("mlp")
        model.optimizer.build(model.trainable_variables)
    step = model.train_step

    def train_step(data: Any) -> Any:
        with tf.device(device):
            return step(data)

    model.train_step = train_step
    return model


def _tf_pieces(model: Any, device: str, batch: list[Any], m: int, tf: Any
               ) -> Callable[[], Any]:
    """TensorFlow alone, no engine: `model`'s forward, loss and backward for `batch` (the
    variables `[x, y]` on `device`), in `m` pieces in sequence (one tape each, gradients
    summed in the same function; no optimizer step). Against `m = 1` it is what
    TensorFlow's kernels charge for splitting the batch, which bounds any engine's speedup
    on these kernels."""
    x, y = batch
    loss_fn = model.loss

    @tf.function(autograph=False)
    def pieces() -> Any:
        with tf.device(device):
            total = None
            for xs, ys in zip(tf.split(x.read_value(), m), tf.split(y.read_value(), m)):
                with tf.GradientTape() as tape:
                    loss = loss_fn(ys, model(xs, training=True)) / m
                grads = tape.gradient(loss, model.trainable_variables)
                total = grads if total is None else [a + b for a, b in zip(total, grads)]
            return tf.add_n([tf.reduce_sum(g) for g in total])

    return pieces


def _overlap(d0: str, d1: str, tf: Any, batch: int
             ) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Can a worker send a tensor while it computes? `chain`: 6 matmuls (batch x 1024 by
    1024 x 1024) on worker 0. `overlap`: on worker 0 a chain `a`, then a chain `b` (after
    `a`); on worker 1 a chain on `a`. It takes 2 chains when worker 0 sends `a` while it runs
    `b`, 3 when the transfer waits until worker 0 is idle."""
    with tf.device(d0):
        x = tf.Variable(tf.random.normal((batch, WIDTH)))
        w0 = tf.Variable(tf.random.normal((WIDTH, WIDTH)) * 0.03)
    with tf.device(d1):
        w1 = tf.Variable(tf.random.normal((WIDTH, WIDTH)) * 0.03)

    def run(t: Any, w: Any) -> Any:
        for _ in range(6):
            t = tf.matmul(t, w)
        return t

    @tf.function(autograph=False)
    def chain() -> Any:
        with tf.device(d0):
            return tf.reduce_sum(run(x.read_value(), w0)[:1, :1])

    @tf.function(autograph=False)
    def overlap() -> Any:
        with tf.device(d0):
            a = run(x.read_value(), w0)
            with tf.control_dependencies([a]):
                b = run(x.read_value() + 1.0, w0)
        with tf.device(d1):
            c = run(a, w1)
        with tf.device(d0):
            return tf.reduce_sum(b[:1, :1]) + tf.reduce_sum(c[:1, :1])

    return chain, overlap


def _reduce(d0: str, tf: Any, x: Any) -> Callable[[], Any]:
    @tf.function(autograph=False)
    def reduce(t: Any) -> Any:
        with tf.device(d0):
            return tf.reduce_sum(t[:1])

    return lambda: reduce(x)


def _timeline(piped: Callable[..., Any], data: Any, stages: int, m: int, schedule: str,
              args: argparse.Namespace, one_worker: bool = False) -> dict[str, Any]:
    """One profiled configuration (`profile=True`): medians over `args.steps` steps of the
    wall time per step and of the figures of each step's measured timeline.

    `lead` is the time from Keras's batch start to the first action's start (dispatch, data
    feed, the micro-batch split), `tail` from the last action's end to Keras's batch end (the
    optimizer step, the loss and metrics, the return to the client).
    """
    import keras

    from tfpipe.schedules.simulate import Costs, simulate

    pipe = piped(stages, m, schedule, profile=True, one_worker=one_worker)

    def fit(n: int, *callbacks: Any) -> None:
        pipe.fit(data, steps_per_epoch=n, callbacks=list(callbacks), epochs=1, verbose=0)

    walls = Runner(fit).visit(2, 1, args.steps)  # wall time without reading timelines
    timelines: list[Any] = []
    edges: list[float] = []

    class Grab(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self.begin = time.time()  # tf.timestamp()'s clock

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            end = time.time()
            stamps = pipe.executor.stamps.numpy()
            edges.extend([1e3 * (stamps[:, 0].min() - self.begin),
                          1e3 * (end - stamps[:, 1].max())])
            timelines.append(pipe.timeline())

    fit(args.steps, Grab())
    figures = [_figures(t, stages) for t in timelines]

    def med(key: str, i: int | None = None) -> float:
        return median([f[key] if i is None else f[key][i] for f in figures])

    forward = [med("forward_ms", s) for s in range(stages)]
    backward = [med("backward_ms", s) for s in range(stages)]
    predicted = simulate(pipe.schedule, Costs(forward=forward, backward=backward)).step_time
    hops = [f["hop_ms"] for f in figures if f["hop_ms"] is not None]
    return {
        "config": f"{'sequential' if stages == 1 else schedule} M={m}"
        + (", 1 worker" if one_worker else ""),
        "wall_ms": walls[0], "span_ms": med("span_ms"),
        "busy_ms": [med("busy_ms", r) for r in range(stages)],
        "forward_ms": forward, "backward_ms": backward,
        "hop_ms": median(hops) if hops else None,
        "predicted_span_ms": predicted,
        "lead_ms": median(edges[0::2]), "tail_ms": median(edges[1::2]),
        "actions": [[rank, str(a), t0, t1] for rank, a, t0, t1 in timelines[-1]],
    }


def _figures(timeline: list[Any], stages: int) -> dict[str, Any]:
    """Span, busy time per rank, mean F and B per stage, and mean hop of one step's timeline."""
    span, per_rank = rank_busy(timeline)
    fwd: list[list[float]] = [[] for _ in range(stages)]
    bwd: list[list[float]] = [[] for _ in range(stages)]
    when = {}
    for _, action, start, end in timeline:
        (fwd if action.kind == "F" else bwd)[action.stage].append(end - start)
        when[(action.kind, action.stage, action.micro_batch)] = (start, end)
    gaps = []
    for (kind, s, mb), (start, _) in when.items():
        before = (kind, s - 1, mb) if kind == "F" else (kind, s + 1, mb)
        if before in when:
            gaps.append(start - when[before][1])
    return {
        "span_ms": span,
        "busy_ms": [per_rank.get(r, 0.0) for r in range(stages)],
        "forward_ms": [sum(v) / len(v) for v in fwd],
        "backward_ms": [sum(v) / len(v) for v in bwd],
        "hop_ms": sum(gaps) / len(gaps) if gaps else None,
    }


# entry point --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_args(parser, "a smoke run: M in {1, 2}, 2 rounds of 1 run of 2 steps",
                    "out/workers.json", quiet=True)
    parser.add_argument("--micro-batches", default=None, help="default 1,2,4,8,16 (1,2 quick)")
    parser.add_argument("--schedules", default="gpipe,1f1b")
    parser.add_argument("--peer", action="store_true",
                        help="also time torch.distributed.pipelining in every round")
    parser.add_argument("--timeline", action="store_true",
                        help="also record tfpipe's measured timeline of each configuration")
    parser.add_argument("--rank-loops", default="false",
                        choices=["false", "true", "both", "steady"],
                        help="true: the pipelines of M > 1 micro-batches (sequential too) run "
                        "tfpipe's rank loops; both: also `<schedule>+loops` rows beside the "
                        "unrolled ones, in the same rounds; steady: `<schedule>+steady` rows, "
                        "the steady loop (1F1B) (--timeline's profiled runs are always "
                        "unrolled: the loops do not profile)")
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-pids", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick_timing(args)
    args.micro_batches = args.micro_batches or ("1,2" if args.quick else "1,2,4,8,16")
    check_timing(parser, args)
    if args.client:
        client(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
