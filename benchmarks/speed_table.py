"""The table of `workers.py` and `peer_torch.py`: speedups, schedule bounds and efficiencies.

Both benchmarks time configurations under labels and hand `rows` a mapping from label to the
milliseconds per step of every timed run. Labels:

- `baseline`: one one-thread process running the whole model, one micro-batch (a);
- `model.fit`: plain `model.fit` on that process (tfpipe only);
- `sequential M=m`: one process, the same M micro-batches one after another, gradients
  accumulated, one update (c);
- `gpipe M=m`, `1f1b M=m`: two one-thread processes, a 2-stage pipeline (b);
- `comm M=m`: the 2 M boundary hops of one step alone (tfpipe only; see `workers.py`);
- labels with a colon (`probe:dispatch`, `busy:<label>`) are extra figures, not rows.

Definitions (K = 2 stages, M micro-batches, medians over the timed runs):

- speedup = baseline ms / ms;
- bound = K M / (M + K - 1) = 2M / (M + 1): the schedule's speedup over one process running
  the same M micro-batches in sequence, when a micro-batch costs the same on either rank and
  transfers are free (bubble (K-1)/(M+K-1));
- eff = speedup / bound: against the whole-batch baseline, so it also pays what smaller
  micro-batches cost;
- vs seq = sequential M=m ms / ms (for M = 1 the baseline): the pipeline against the same
  micro-batches in sequence, which isolates what pipelining gains;
- eff/seq = vs seq / bound: the issue's "efficiency versus same-M sequential accumulation".

Kept free of TensorFlow and PyTorch imports: the parent process of `workers.py` uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Any

PIPELINED = ("gpipe", "1f1b")
"""Schedule names that label pipelined configurations (the torch ones use the same names);
`"1f1b+loops"` is 1F1B run by tfpipe's rank loops (`workers.py --rank-loops both`)."""


def schedule_of(config: str) -> str:
    """`"1f1b+loops"` -> `"1f1b"`: the schedule a configuration's name starts with."""
    return config.partition("+")[0]

HEADER = (
    f"{'system':<7} {'config':<10} {'M':>3} {'ms/step':>8} {'spread':>6} {'speedup':>7} "
    f"{'bound':>5} {'eff':>5} {'seq ms':>7} {'vs seq':>6} {'eff/seq':>7} {'comm ms':>7}"
)


def bound(m: int, k: int = 2) -> float:
    """The schedule's speedup bound over sequential accumulation: K M / (M + K - 1)."""
    return k * m / (m + k - 1)


def split_label(label: str) -> tuple[str, int]:
    """`"1f1b M=4"` -> `("1f1b", 4)`; `"baseline"` -> `("baseline", 1)`."""
    name, _, m = label.partition(" M=")
    return name, int(m) if m else 1


def rows(system: str, times: dict[str, list[float]]) -> list[dict[str, Any]]:
    """One row per configuration (comm rows folded into the pipelined rows of their M).

    Args:
        system: `"tfpipe"` or `"torch"`.
        times: label -> milliseconds per step of each timed run.

    Returns:
        Dicts with `system, config, M, ms, spread` (max/min - 1 over the runs, a noise
        gauge), `runs`, `speedup`, and for pipelined rows `bound, efficiency, sequential_ms,
        speedup_vs_sequential, efficiency_vs_sequential, comm_ms`.
    """
    med = {label: statistics.median(v) for label, v in times.items() if v}
    base = med.get("baseline")
    out = []
    for label, ms in med.items():
        name, m = split_label(label)
        if name == "comm" or ":" in name:  # "probe:...", "busy:...": not table rows
            continue
        row: dict[str, Any] = {
            "system": system,
            "config": name,
            "M": m,
            "ms": ms,
            "spread": max(times[label]) / min(times[label]) - 1,
            "runs": len(times[label]),
            "speedup": base / ms if base else None,
        }
        if schedule_of(name) in PIPELINED:  # against the same micro-batches in sequence
            seq = med.get("baseline" if m == 1 else f"sequential M={m}")
            row["bound"] = bound(m)
            row["efficiency"] = row["speedup"] / bound(m) if base else None
            row["sequential_ms"] = seq
            row["speedup_vs_sequential"] = seq / ms if seq else None
            row["efficiency_vs_sequential"] = seq / ms / bound(m) if seq else None
            row["comm_ms"] = med.get(f"comm M={m}")
        out.append(row)
    order = {"baseline": 0, "model.fit": 1, "sequential": 2, "gpipe": 3, "1f1b": 4}
    return sorted(out, key=lambda r: (order.get(schedule_of(r["config"]), 9), r["config"],
                                      r["M"]))


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def format_rows(table: list[dict[str, Any]]) -> list[str]:
    """The table as text lines, `HEADER` first."""
    lines = [HEADER]
    for r in table:
        lines.append(
            f"{r['system']:<7} {r['config']:<10} {r['M']:>3} {r['ms']:8.1f} "
            f"{100 * r['spread']:5.0f}% {_num(r['speedup'], 7, 2)} "
            f"{_num(r.get('bound'), 5, 2)} {_num(r.get('efficiency'), 5, 2)} "
            f"{_num(r.get('sequential_ms'), 7, 1)} {_num(r.get('speedup_vs_sequential'), 6, 2)} "
            f"{_num(r.get('efficiency_vs_sequential'), 7, 2)} {_num(r.get('comm_ms'), 7, 1)}"
        )
    return lines


def best(table: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pipelined row with the highest speedup over the baseline, or None."""
    piped = [r for r in table
             if schedule_of(r["config"]) in PIPELINED and r["speedup"] is not None]
    return max(piped, key=lambda r: r["speedup"]) if piped else None


def summary(table: list[dict[str, Any]]) -> str:
    """One line: the best pipelined speedup, and the lowest 1F1B efficiency versus sequential."""
    top = best(table)
    if top is None:
        return f"{table[0]['system'] if table else '?'}: no pipelined configuration timed"
    line = (
        f"{top['system']}: best speedup {top['speedup']:.2f} over its baseline "
        f"({top['config']} M={top['M']}, {top['ms']:.1f} ms/step)"
    )
    for config in ("1f1b", "1f1b+loops", "1f1b+steady"):
        effs = [
            (r["efficiency_vs_sequential"], r["M"])
            for r in table
            if r["config"] == config and r.get("efficiency_vs_sequential") is not None
        ]
        if effs:
            low, at = min(effs)
            name = config.replace("1f1b", "1F1B").replace("+loops", " (rank loops)").replace(
                "+steady", " (steady loop)")
            line += f"; {name} efficiency vs same-M sequential: lowest {low:.2f} (M={at})"
    return line


def stage_bounds(timelines: list[dict[str, Any]], times: dict[str, list[float]]
                 ) -> list[dict[str, Any]]:
    """What the measured stage costs leave to any engine: one dict per pipelined timeline
    that has a `, 1 worker` twin (`workers.py --timeline`).

    The twin runs the same two stages in schedule order on one worker, so its actions cost
    what TensorFlow's kernels charge for this split and these micro-batches, with no
    transfer and no second process; `predicted_span_ms` is the schedule's span with those
    costs and free transfers (`tfpipe.schedules.simulate`). Profiling slows every action,
    so that span is scaled by the sequential step's unprofiled over profiled time (`scale`).
    The result leaves out the step's fixed costs (dispatch, feed, optimizer), so it is a
    lower bound on the step time of any engine on these kernels.

    Args:
        timelines: `workers.py`'s timeline dicts (`config`, `wall_ms`, `predicted_span_ms`).
        times: label -> unprofiled milliseconds per step of each timed run.

    Returns:
        Dicts with `config`, `M`, `bound_ms`, `scale`, `measured_ms`, `speedup_bound`
        (baseline / bound_ms), `speedup` (baseline / measured_ms), `efficiency_vs_sequential_bound`
        (sequential / bound_ms / `bound(M)`) and `of_bound` (bound_ms / measured_ms).
    """
    profiled = {t["config"]: t for t in timelines}
    base = median(times.get("baseline", []))
    out = []
    for config, twin in profiled.items():
        label = config.removesuffix(", 1 worker")
        m = split_label(label)[1]
        seq = profiled.get(f"sequential M={m}")
        if label == config or seq is None or label not in times:
            continue
        seq_ms = median(times[f"sequential M={m}"])
        scale = seq_ms / seq["wall_ms"]
        bound_ms = twin["predicted_span_ms"] * scale
        measured = median(times[label])
        out.append({"config": split_label(label)[0], "M": m, "bound_ms": bound_ms,
                    "scale": scale, "measured_ms": measured, "speedup_bound": base / bound_ms,
                    "speedup": base / measured,
                    "efficiency_vs_sequential_bound": seq_ms / bound_ms / bound(m),
                    "of_bound": bound_ms / measured})
    return out


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of all CPUs' time spent busy over the next `seconds` (Linux `/proc/stat`)."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_quiet(limit: float | None, max_wait_s: float) -> float | None:
    """Waits (at most `max_wait_s`) until the CPUs are less than `limit` busy; returns the
    last busy fraction measured (None when `limit` is None: no waiting, nothing measured).

    Called while the benchmark's own processes are idle, so what it sees is other work on a
    shared machine.
    """
    if limit is None:
        return None
    import time

    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy()
    while busy >= limit and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


# what the timing scripts share (workers.py, peer_torch.py, plan_accuracy.py, worker_memory.py)


def median(values: list[float]) -> float:
    """The median of `values`, NaN for none."""
    return statistics.median(values) if values else float("nan")


def add_timing_args(parser: argparse.ArgumentParser, quick: str, json_path: str,
                    quiet: bool = False) -> None:
    """`--batch` (the peer model's batch, default 256); `--rounds`, `--runs`, `--steps`,
    `--warmup`: how each configuration is timed; `--pin`; `--quick`
    (with help `quick`), `--round-timeout`, `--json` (default `json_path`); with `quiet`,
    `--quiet` and `--quiet-wait` (see `wait_quiet`)."""
    parser.add_argument("--batch", type=int, default=256,
                        help="samples per step (256: small micro-batches, where pipelining on a "
                        "CPU cannot win; 2048: micro-batches that keep a device busy)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=2, help="timed runs per visit")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per visit")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--round-timeout", type=float, default=1800.0)
    parser.add_argument("--json", "--out", dest="json", default=json_path)
    parser.add_argument("--pin", default="true", choices=["true", "false"],
                        help="true: each worker, and each torch process, on a core of its own "
                        "(one-core devices; the one-process rows on the first core)")
    if quiet:
        parser.add_argument("--quiet", type=float, default=None, metavar="BUSY",
                            help="before timing each configuration, wait until the CPUs are "
                            "less than this fraction busy (other work on a shared machine)")
        parser.add_argument("--quiet-wait", type=float, default=300.0,
                            help="the longest such wait, in seconds")


def quick_timing(args: argparse.Namespace) -> None:
    """With `--quick`: 2 rounds of 1 run of 2 steps after 1 warm-up step."""
    if args.quick:
        args.rounds, args.runs, args.steps, args.warmup = 2, 1, 2, 1


def check_timing(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses timing arguments below 1 (exits 2 with the parser's usage)."""
    if args.warmup < 1 or args.rounds < 1 or args.runs < 1 or args.steps < 1:
        parser.error("--warmup, --rounds, --runs and --steps must be at least 1")


def load_line(before: Any, after: Any) -> str:
    """The `[load]` line: 1-minute load averages before and after a run."""
    return (f"[load] 1-min load average {before[0]:.2f} before, {after[0]:.2f} after "
            f"({os.cpu_count()} CPUs)")


def write_json(path: str | None, report: dict[str, Any]) -> None:
    """Writes `report` to `path` (its folder made if needed); nothing for no path."""
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
