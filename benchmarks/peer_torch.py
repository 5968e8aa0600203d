"""The PyTorch peer: `torch.distributed.pipelining` on the peer MLP, two one-thread processes.

The same model as `workers.py` (8 x Linear(1024, 1024) + ReLU, then Linear(1024, 10); batch
256 or `--batch N`; SGD, learning rate 0.01; cross-entropy), timed in the same configurations:

- `baseline`: one process with one thread (`torch.set_num_threads(1)`) running the whole
  model on the whole batch;
- `sequential M=m`: that process running the batch as M micro-batches in sequence,
  gradients accumulated, one update;
- `gpipe M=m`, `1f1b M=m`: two such processes joined by gloo over loopback, stage 0 the first
  4 Linear + ReLU, stage 1 the other 4 and the head (tfpipe's split by parameters), with
  `ScheduleGPipe` / `Schedule1F1B`; rank 0 holds the data, rank 1 the targets and the loss.

With `--pin true` (the default) the single process runs on the first core and rank r on the
(r+1)-th (`taskset`), as tfpipe's one-core workers. A round starts a fresh single process,
then a fresh pair; each runs every configuration once
(in an order rotated from round to round): `--warmup` untimed steps, then `--runs` timed runs
of `--steps` steps (pipelined runs start and end at a barrier of both ranks). Figures are
medians over all timed runs. The table's columns are described in `speed_table.py`.
`workers.py --peer` calls `torch_round` in each of its rounds, so tfpipe and torch are
measured side by side. Every child process is ended at the end, also on an error or Ctrl-C,
and every wait is bounded.

Needs the `bench` extra: `pip install -e '.[bench]'` (torch 2.13.0).

Usage:
    python -m benchmarks.peer_torch [--quick] [--batch 256] [--rounds 3] [--runs 2] [--steps 10]
        [--micro-batches 2,4,8,16] [--schedules gpipe,1f1b] [--quiet 0.3 --quiet-wait 30]
        [--json out/peer_torch.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # `python benchmarks/peer_torch.py`: import its folder as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.speed_table import (
    add_timing_args,
    format_rows,
    load_line,
    quick_timing,
    rows,
    summary,
    wait_quiet,
    write_json,
)

WIDTH = 1024
DEPTH = 8
CLASSES = 10
DISTINCT_BATCHES = 8
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def check_torch() -> None:
    """Raises SystemExit with the install line when PyTorch is missing."""
    try:
        import torch  # noqa: F401
        import torch.distributed.pipelining  # noqa: F401
    except ImportError as err:
        raise SystemExit(
            f"The PyTorch peer needs torch ({err}): pip install -e '.[bench]'"
        ) from None


# the orchestrating process ------------------------------------------------------------------
# (`tfpipe.processes` is imported here only: the timed torch processes import no TensorFlow)


def _result(proc: subprocess.Popen[str], log: Path, what: str, timeout_s: float) -> Any:
    """Waits (bounded) for a child to end; the JSON of its `RESULT` line."""
    from tfpipe import processes

    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        processes.end(proc)
        raise RuntimeError(f"torch {what}: no result within {timeout_s:.0f} s; log {log}") from None
    found = [line[len("RESULT "):] for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or (what != "rank 1" and not found):
        tail = log.read_text()[-3000:] if log.exists() else ""
        raise RuntimeError(f"torch {what} failed (exit status {proc.returncode}):\n{tail}")
    return json.loads(found[-1]) if found else None


def torch_round(args: argparse.Namespace, round_index: int, logs: Path,
                busy: list[Any] | None = None) -> dict[str, list[float]]:
    """One round: every torch configuration once; label -> ms per step of each timed run.

    With `args.quiet`, each part (the single process, the pair) waits for the machine to be
    quiet first (`speed_table.wait_quiet`); `[part, round, busy fraction]` go to `busy`.
    """
    from tfpipe.processes import ROOT, ProcessGroup, free_port, nth_core

    def on(core: int) -> list[str]:  # `--pin true`: on the core tfpipe's worker `core` gets
        return ["taskset", "-c", str(nth_core(core))] if args.pin == "true" else []

    busy = [] if busy is None else busy
    common = ["--micro-batches", args.micro_batches, "--schedules", args.schedules,
              "--steps", str(args.steps), "--runs", str(args.runs), "--warmup", str(args.warmup),
              "--round", str(round_index), "--quiet-wait", str(args.quiet_wait),
              "--batch", str(args.batch)]
    if args.quiet is not None:
        common += ["--quiet", str(args.quiet)]
    cmd = [sys.executable, "-m", "benchmarks.peer_torch"]
    group = ProcessGroup(logs, env=ENV)
    out: dict[str, list[float]] = {}
    try:
        busy.append(["torch single", round_index, wait_quiet(args.quiet, args.quiet_wait)])
        single = group.spawn([*on(0), *cmd, "--role", "single", *common], "torch-single.log",
                             cwd=ROOT)
        out.update(_result(single, logs / "torch-single.log", "single process",
                           args.round_timeout))
        busy.append(["torch pair", round_index, wait_quiet(args.quiet, args.quiet_wait)])
        port = free_port()
        pair = [group.spawn([*on(rank), *cmd, "--role", "rank", "--rank", str(rank), "--port",
                             str(port), *common], f"torch-rank{rank}.log", cwd=ROOT)
                for rank in (0, 1)]
        out.update(_result(pair[0], logs / "torch-rank0.log", "rank 0", args.round_timeout))
        _result(pair[1], logs / "torch-rank1.log", "rank 1", 60)
    finally:
        group.stop_all()
    return out


def orchestrate(args: argparse.Namespace) -> None:
    """Runs the rounds, prints the table and writes the JSON."""
    from tfpipe import processes

    check_torch()
    processes.raise_on_signals()  # so every child is ended on the way out
    logs = Path(tempfile.mkdtemp(prefix="tfpipe-torch-bench-"))
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {}
    busy: list[Any] = []
    for r in range(args.rounds):
        t0 = time.monotonic()
        for label, ms in torch_round(args, r, logs, busy).items():
            times.setdefault(label, []).extend(ms)
        print(f"[round {r + 1}/{args.rounds}] {time.monotonic() - t0:.0f} s, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    table = rows("torch", times)
    print("\n".join(format_rows(table)))
    print("[summary] " + summary(table))
    load_after = os.getloadavg()
    print(load_line(load_before, load_after))
    if args.json:
        import torch

        write_json(args.json, {"args": vars(args), "torch": torch.__version__,
                               "load_before": load_before, "load_after": load_after,
                               "busy": busy, "times_ms": times, "rows": table})


# the timed processes ------------------------------------------------------------------------


def _model() -> Any:
    """The peer MLP (seed 0): 8 x (Linear(1024, 1024), ReLU), then Linear(1024, 10)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES))


def _data(batch: int) -> list[tuple[Any, Any]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, WIDTH, generator=g), torch.randint(0, CLASSES, (batch,),
                                                                    generator=g))
            for _ in range(DISTINCT_BATCHES)]


def _rotated(items: list[Any], k: int) -> list[Any]:
    k %= max(len(items), 1)
    return items[k:] + items[:k]


def _time_runs(step: Any, args: argparse.Namespace, sync: Any = None) -> list[float]:
    """`args.warmup` untimed steps, then ms per step of `args.runs` runs of `args.steps`."""
    for i in range(args.warmup):
        step(i)
    out = []
    for _ in range(args.runs):
        if sync:
            sync()
        start = time.perf_counter()
        for i in range(args.steps):
            step(i)
        if sync:
            sync()
        out.append(1e3 * (time.perf_counter() - start) / args.steps)
    return out


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def single(args: argparse.Namespace) -> dict[str, list[float]]:
    """The one-process configurations: the whole batch, and M micro-batches in sequence."""
    import torch

    _one_thread()
    data = _data(args.batch)
    loss_fn = torch.nn.CrossEntropyLoss()
    ms = [1] + [m for m in _ints(args.micro_batches) if m > 1]
    out = {}
    for m in _rotated(ms, args.round):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(i: int, model: Any = model, opt: Any = opt, m: int = m) -> None:
            x, y = data[i % len(data)]
            for xs, ys in zip(x.chunk(m), y.chunk(m)):
                (loss_fn(model(xs), ys) / m).backward()
            opt.step()
            opt.zero_grad()

        label = "baseline" if m == 1 else f"sequential M={m}"
        if args.quiet is not None:
            out[f"busy:{label}"] = [wait_quiet(args.quiet, args.quiet_wait)]
        out[label] = _time_runs(step, args)
    return out


def rank(args: argparse.Namespace) -> dict[str, list[float]]:
    """One rank of the 2-stage pipelined configurations (rank 0 returns the times)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    _one_thread()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=2, timeout=timedelta(seconds=300 + args.quiet_wait))
    kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    data = _data(args.batch)
    loss_fn = torch.nn.CrossEntropyLoss()
    configs = [(s, m) for m in _ints(args.micro_batches) if m > 1
               for s in args.schedules.split(",") if s]
    out = {}
    try:
        for schedule, m in _rotated(configs, args.round):
            layers = list(_model())
            half = 2 * DEPTH // 2  # 4 x (Linear, ReLU) per stage, the head on stage 1
            part = torch.nn.Sequential(*(layers[:half] if args.rank == 0 else layers[half:]))
            stage = PipelineStage(part, args.rank, 2, torch.device("cpu"))
            runner = kinds[schedule](stage, n_microbatches=m, loss_fn=loss_fn)
            opt = torch.optim.SGD(part.parameters(), lr=0.01)

            def step(i: int, runner: Any = runner, opt: Any = opt) -> None:
                x, y = data[i % len(data)]
                if args.rank == 0:
                    runner.step(x)
                else:
                    runner.step(target=y)
                opt.step()
                opt.zero_grad()

            label = f"{schedule} M={m}"
            if args.quiet is not None:  # rank 0 waits for a quiet machine, rank 1 for rank 0
                if args.rank == 0:
                    out[f"busy:{label}"] = [wait_quiet(args.quiet, args.quiet_wait)]
                dist.barrier()
            out[label] = _time_runs(step, args, sync=dist.barrier)
    finally:
        dist.destroy_process_group()
    return out


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


# entry point --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_args(parser, "a smoke run: M = 2, 2 rounds of 1 run of 2 steps",
                    "out/peer_torch.json", quiet=True)
    parser.add_argument("--micro-batches", default=None, help="default 2,4,8,16 (2 quick)")
    parser.add_argument("--schedules", default="gpipe,1f1b")
    parser.add_argument("--role", choices=["single", "rank"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick_timing(args)
    args.micro_batches = args.micro_batches or ("2" if args.quick else "2,4,8,16")
    if args.role is None:
        orchestrate(args)
        return
    result = single(args) if args.role == "single" else rank(args)
    if args.role == "single" or args.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
