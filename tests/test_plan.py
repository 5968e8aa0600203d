"""The planner: measured costs, ranked configurations, memory budgets, and plans that train exactly like `model.fit`."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tfpipe
from tests.models import StepLog, assert_same_training, build, data
from tfpipe import cli
from tfpipe.planner import Edge, Profile, search
from tfpipe.planner.costs import CostModel, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GPUS = [f"/device:GPU:{i}" for i in range(4)]  # names only: `search` does no TensorFlow work
# As in test_schedule_execution: Adam through 9 tanh layers lifts float32 summation-order
# noise in near-zero gradients to ~2e-5 relative; SGD keeps the 1e-5 comparison tight.
OPT = "sgd"


def synthetic(n: int = 8, overhead: float = 1e-3, per_sample: float = 1e-5,
              sizes=(1, 2, 4, 8, 16, 32, 64), act: float = 4096.0, state: float = 1e5) -> Profile:
    """A chain of n equal layers whose time is `overhead + per_sample * size`."""
    edges = (Edge(-1, (0,), act),) + tuple(
        Edge(i, (i + 1,) if i + 1 < n else (), act) for i in range(n))
    seconds = tuple((s, tuple(overhead + per_sample * s for _ in range(n))) for s in sizes)
    return Profile(tuple(f"dense_{i}" for i in range(n)), (1e4,) * n, (state,) * n, (act,) * n,
                   edges, seconds, "/device:GPU:0")


# the cost model, on hand-made profiles -------------------------------------------------------

def test_small_micro_batches_cost_what_they_measured():
    prof = synthetic()
    plan = search(prof, 64, GPUS[:1], micro_batches=(1, 4), schedules=("gpipe",),
                  recompute=("never",))
    step = {c.micro_batches: c.step_time for c in plan.configs}
    # one device: the step is M micro-batches of ceil(64 / M) samples, each at its own time
    assert step[1] == pytest.approx(8 * (1e-3 + 1e-5 * 64))
    assert step[4] == pytest.approx(4 * 8 * (1e-3 + 1e-5 * 16))
    assert step[4] > 2.5 * step[1]  # a linear share of the batch would make them equal


def test_profile_interpolates_between_measured_sizes():
    prof = synthetic(sizes=(4, 16))
    assert prof.layer_seconds(10)[0] == pytest.approx(1e-3 + 1e-5 * 10)
    assert prof.layer_seconds(2) == prof.layer_seconds(4)  # below: per-call overhead dominates
    assert prof.layer_seconds(32)[0] == pytest.approx(2 * (1e-3 + 1e-5 * 16))


def test_memory_follows_schedule_and_recompute():
    model = CostModel(synthetic(), batch_size=64, bandwidth=10e9)
    peak = {
        (s, r): max(model.estimate([2, 2, 2, 2], 8, s, recompute=r).peak_bytes)
        for s in ("gpipe", "1f1b") for r in ("never", "always")
    }
    assert peak["gpipe", "never"] > peak["1f1b", "never"] > peak["1f1b", "always"]
    # 1F1B holds K = 4 micro-batches on stage 0: state + 4 x (input + 2 outputs) x 8 samples;
    # the state of 2 calls, plus 2 more float32 gradient copies of their 1e4 parameters each
    # while a micro-batch's gradients are added to the running sum (M > 1)
    state, per_mb = 2 * 1e5 + 2 * 1e4 * 4 * 2, 3 * 4096.0 * 8
    assert model.estimate([2, 2, 2, 2], 8, "1f1b").peak_bytes[0] == pytest.approx(state + 4 * per_mb)
    one = CostModel(synthetic(), batch_size=64, bandwidth=10e9).estimate([2, 2, 2, 2], 1, "1f1b")
    assert one.peak_bytes[0] == pytest.approx(2 * 1e5 + 3 * 4096.0 * 64)  # M = 1: no sum


def test_transfer_costs_bytes_over_bandwidth():
    slow = CostModel(synthetic(), 64, bandwidth=1e6).estimate([2, 2, 2, 2], 8, "1f1b")
    fast = CostModel(synthetic(), 64, bandwidth=1e12).estimate([2, 2, 2, 2], 8, "1f1b")
    assert slow.transfer == pytest.approx(4096.0 * 8 / 1e6)
    assert slow.step_time > fast.step_time + 10 * slow.transfer


def test_transfer_latency_is_paid_by_every_hop():
    def model(**kw):
        return CostModel(synthetic(), 64, **kw)

    est = model(bandwidth=1e6, latency=2e-3).estimate([2, 2, 2, 2], 8, "1f1b")
    assert est.transfer == pytest.approx(2e-3 + 4096.0 * 8 / 1e6)
    assert model(bandwidth=math.inf, latency=2e-3).estimate([4, 4], 8, "1f1b").transfer == 2e-3
    assert model(bandwidth=1e6, latency=2e-3).estimate([8], 8, "1f1b").transfer == 0.0
    shared = model(bandwidth=math.inf, latency=1e-3, parallel=False)
    est = shared.estimate([4, 4], 4, "gpipe")  # devices take turns: every hop adds its latency
    assert est.step_time == pytest.approx(sum(est.simulation.busy_time) + 2 * 4 * 1e-3)
    for bad in (-1e-3, math.nan, math.inf):
        with pytest.raises(ValueError, match="latency"):
            model(bandwidth=1e9, latency=bad)


def test_shared_processor_adds_up_all_work():
    shared = CostModel(synthetic(), 64, 10e9, parallel=False).estimate([2, 2, 2, 2], 8, "1f1b")
    hops = 2 * 3 * 8  # each of 8 micro-batches crosses 3 cuts forward and 3 back
    work = sum(shared.simulation.busy_time) + hops * shared.transfer
    assert shared.step_time == pytest.approx(work, rel=1e-9)
    assert shared.step_time > shared.simulation.step_time


def test_a_split_backward_costs_one_backward():
    """`I` runs the stage function's whole gradient function and keeps the weight gradients,
    so `W` has nothing left (docs/schedules.md, "Known costs and limits"): the plan prices `I`
    as a `B` and `W` at nothing, and frees a micro-batch's activations at its `I`."""
    model = CostModel(synthetic(), 64, bandwidth=math.inf, parallel=False)
    zb, plain = model.estimate([4, 4], 8, "zb-h1"), model.estimate([4, 4], 8, "1f1b")
    assert sum(zb.simulation.busy_time) == pytest.approx(sum(plain.simulation.busy_time),
                                                         rel=1e-9)
    recompute = model.estimate([4, 4], 8, "zb-h1", recompute="always")
    forward = 1 / 3 * 4 * (1e-3 + 1e-5 * 8)  # a stage of 4 layers at 8 samples, 1/3 of it
    assert sum(recompute.simulation.busy_time) == pytest.approx(  # I replays the forward
        sum(zb.simulation.busy_time) + 2 * 8 * forward, rel=1e-9)


def test_step_overhead_is_paid_once_per_step_by_device_count():
    free = CostModel(synthetic(), 64, 10e9)
    paid = CostModel(synthetic(), 64, 10e9, step_overhead=(1e-3, 2e-3))
    for balance, extra in (([8], 1e-3), ([4, 4], 2e-3), ([2, 2, 2, 2], 2e-3)):  # last for more
        a, b = free.estimate(balance, 8, "1f1b"), paid.estimate(balance, 8, "1f1b")
        assert b.step_time == pytest.approx(a.step_time + extra, rel=1e-12)


def test_ranked_fitting_first_then_by_peak():
    plan = search(synthetic(), 64, GPUS, memory_budget=600e3)
    fits = [c.fits for c in plan.configs]
    assert fits == sorted(fits, reverse=True) and 0 < sum(fits) < len(fits)
    times = [c.step_time for c in plan.fitting]
    assert times == sorted(times, key=lambda t: float(f"{t:.6g}"))
    assert all(c.peak_memory <= 600e3 for c in plan.fitting)
    assert all(c.peak_memory > 600e3 for c in plan.configs if not c.fits)
    assert plan.best is plan.configs[0] and plan.best.fits
    names = {(c.schedule, c.recompute) for c in plan.configs}
    assert ("interleaved", "always") in names and ("zb-h1", "except_last") in names
    for c in plan.configs:
        kw = c.kwargs()
        assert sum(kw["balance"]) == 8 and len(kw["balance"]) == c.stages * c.chunks
        assert c.micro_batches <= 64 and c.devices == tuple(GPUS[: c.stages])


def test_looped_bfs_is_predicted_with_chunks_and_searched_when_fit_can_run_it():
    from tfpipe.planner.search import SCHEDULES

    plan = search(synthetic(), 64, GPUS, micro_batches=(4, 8), recompute=("never",),
                  schedules=("interleaved", "looped-bfs"), bandwidth=math.inf)  # no transfer
    bfs = [c for c in plan.configs if c.schedule == "looped-bfs"]
    assert bfs and all(c.chunks == 2 and len(c.balance) == 2 * c.stages and c.stages > 1
                       for c in bfs)
    for c in bfs:  # GPipe's memory: no less than interleaved's; equal pieces: its bubble
        twin = next(i for i in plan.configs if i.schedule == "interleaved"
                    and (i.stages, i.balance, i.micro_batches) == (c.stages, c.balance,
                                                                   c.micro_batches))
        assert c.peak_memory >= twin.peak_memory
        if len(set(c.balance)) == 1:
            assert c.bubble == pytest.approx(twin.bubble, rel=1e-9)
    assert {"looped-bfs", "zb-v"} <= set(SCHEDULES)
    default = {c.schedule for c in search(synthetic(), 64, GPUS, micro_batches=(4,)).configs}
    assert set(SCHEDULES) <= default  # every one, as tfpipe.fit(plan=best) runs them by name


def test_zb_v_is_predicted_with_two_chunks_and_beats_zb_h1():
    plan = search(synthetic(), 64, GPUS, micro_batches=(8,), recompute=("never",),
                  schedules=("zb-h1", "zb-v"), chunks=3, bandwidth=math.inf)
    zbv = [c for c in plan.configs if c.schedule == "zb-v"]
    assert zbv and all(c.chunks == 2 and len(c.balance) == 2 * c.stages for c in zbv)
    assert {c.stages for c in zbv} == {2, 3, 4}  # not on one device
    for k in (2, 4):  # equal pieces: ZB-V's smaller bubble and step
        v = next(c for c in zbv if c.stages == k and len(set(c.balance)) == 1)
        h = next(c for c in plan.configs if c.schedule == "zb-h1" and c.stages == k
                 and len(set(c.balance)) == 1)
        assert v.bubble < h.bubble and v.step_time < h.step_time
        # Its peak holds as many stages' worth of micro-batches as ZB-H1's
        # (test_schedules_properties), but each of its twice as many pieces also keeps its own
        # input: in bytes 9% more here at K=2 (4 pieces of 2 layers), 22% at K=4 (1 layer each).
        assert h.peak_memory <= v.peak_memory


def test_interleaved_zb_is_predicted_with_chunks_at_interleaved_memory():
    from tfpipe.planner.search import SCHEDULES

    assert "interleaved-zb" in SCHEDULES
    plan = search(synthetic(), 64, GPUS, micro_batches=(8,), recompute=("never",),
                  schedules=("interleaved", "interleaved-zb"), chunks=2, bandwidth=math.inf)
    zb = [c for c in plan.configs if c.schedule == "interleaved-zb"]
    assert zb and all(c.chunks == 2 and len(c.balance) == 2 * c.stages and c.stages > 1
                      for c in zb)
    for k in (2, 4):  # equal pieces: interleaved's bubble and peak memory
        mine = next(c for c in zb if c.stages == k and len(set(c.balance)) == 1)
        twin = next(c for c in plan.configs if c.schedule == "interleaved" and c.stages == k
                    and c.balance == mine.balance)
        assert mine.bubble == pytest.approx(twin.bubble) and mine.peak_memory == twin.peak_memory
        # (no smaller bubble: its `I` costs a whole backward and its `W` nothing, "Known
        # costs and limits" in docs/schedules.md, so the split has nothing to move)


def test_dualpipe_v_is_predicted_with_two_chunks_from_two_micro_batches_per_device():
    from tfpipe.planner.search import SCHEDULES

    assert "dualpipe-v" in SCHEDULES
    plan = search(synthetic(), 64, GPUS, micro_batches=(4, 8), recompute=("never",),
                  schedules=("zb-v", "dualpipe-v"), chunks=3, bandwidth=math.inf)
    dpv = [c for c in plan.configs if c.schedule == "dualpipe-v"]
    assert dpv and all(c.chunks == 2 and len(c.balance) == 2 * c.stages for c in dpv)
    # M >= 2K only (zb-v also runs K=3 and 4 with M=4)
    assert {(c.stages, c.micro_batches) for c in dpv} == {(2, 4), (2, 8), (3, 8), (4, 8)}
    for k, m in ((2, 4), (2, 8), (4, 8)):  # equal pieces, against ZB-V on the same pieces
        v = next(c for c in dpv if (c.stages, c.micro_batches) == (k, m)
                 and len(set(c.balance)) == 1)
        z = next(c for c in plan.configs if c.schedule == "zb-v" and c.balance == v.balance
                 and c.micro_batches == m)
        # a shorter step and a smaller bubble than ZB-V's on the same pieces; one more
        # piece's activations per device (2K + 1)
        assert v.step_time < z.step_time and v.bubble < z.bubble
        assert v.peak_memory > z.peak_memory
    with pytest.raises(tfpipe.PipelineError, match=r"micro_batches=\[4\] .* allow none"):
        search(synthetic(), 64, GPUS, stages=(4,), micro_batches=(4,),
               schedules=("dualpipe-v",), bandwidth=math.inf)


def test_no_configuration_fits():
    smallest = min(c.peak_memory for c in search(synthetic(), 64, GPUS).configs)
    with pytest.raises(tfpipe.PipelineError) as err:
        search(synthetic(), 64, GPUS, memory_budget=smallest / 2)
    message = str(err.value)
    assert "No configuration fits memory_budget=" in message
    assert f"smallest peak found is {smallest / 1024:.1f} KiB" in message
    assert "Raise memory_budget" in message and "more devices" in message


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("1.5 GB") == 1.5e9
    with pytest.raises(ValueError, match="2 gigs"):
        parse_bytes("2 gigs")


# measured on the 4 logical CPU devices -------------------------------------------------------

@pytest.fixture(scope="module")
def planned():
    model = build("deep", OPT)
    x, _ = data("deep")
    before = [w.numpy().copy() for w in model.weights]
    plan = tfpipe.plan(model, x[:16], devices=tfpipe.default_devices(), stages=(2, 4),
                       micro_batches=(1, 2, 8), repeats=3)
    return model, before, plan


def test_plan_measures_each_micro_batch_size(planned, tmp_path):
    model, before, plan = planned
    prof = plan.profile
    assert prof.sizes == (2, 8, 16) and prof.num_layers == 9
    per_sample = {s: sum(prof.layer_seconds(s)) / s for s in prof.sizes}
    # small micro-batches cost more per sample (about 8x for these tiny layers; only 1x is
    # asserted, as a busy machine can slow one size's measurements several-fold)
    assert per_sample[2] > per_sample[16]
    for c in plan.configs:  # every prediction is timed at its own micro-batch size
        assert c.micro_batch_size == 16 // c.micro_batches
        if (c.schedule, c.recompute) == ("gpipe", "never"):  # devices take turns: all work
            work = c.micro_batches * sum(prof.layer_seconds(c.micro_batch_size))
            work += plan.cost_model.step_overhead[c.stages - 1]  # plus the step's fixed cost
            hop = plan.cost_model.estimate(c.balance, c.micro_batches, "gpipe").transfer
            work += 2 * (c.stages - 1) * c.micro_batches * hop  # and every hop, in turn
            assert work * (1 - 1e-9) <= c.step_time < work * 1.01
    overhead = plan.cost_model.step_overhead  # measured, one per device count 1..4
    assert len(overhead) == 4 and all(0 < t < 0.1 for t in overhead)
    assert 0 <= plan.cost_model.latency < 0.01 and plan.cost_model.bandwidth > 0  # measured
    assert all(c.stages in (2, 4) for c in plan.configs)
    for w, b in zip(model.weights, before):  # planning changed nothing
        np.testing.assert_array_equal(w.numpy(), b)
    text = str(plan)
    assert text.startswith("Plan for 'deep': batch 16") and "best: tfpipe.fit(model" in text
    assert len(text.splitlines()) == 2 + 2 + 10 + 2 and "step overhead" in text
    png = tmp_path / "best.png"
    assert plan.plot(png) == str(png) and png.read_bytes().startswith(PNG_SIGNATURE)


def test_plan_best_trains_like_keras(planned):
    model, _, plan = planned
    x, y = data("deep")
    ref, ref_log = build("deep", OPT), StepLog()
    ref.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[ref_log])
    log = StepLog()
    history = tfpipe.fit(model, x, y, batch_size=16, epochs=2, plan=plan.best, shuffle=False,
                         verbose=0, callbacks=[log])
    pipe = history.pipeline
    assert len({st.device for st in pipe.stages}) == plan.best.stages
    assert [len(st.layers) for st in pipe.stages] == list(plan.best.balance)
    assert pipe.micro_batches == plan.best.micro_batches
    assert_same_training(ref, ref_log, model, log)


def test_plan_kwargs_train_like_keras(planned):
    _, _, plan = planned
    config = next(c for c in plan.configs
                  if c.schedule in ("interleaved", "zb-h1") and c.recompute != "never")
    x, y = data("deep")
    ref, ref_log = build("deep", OPT), StepLog()
    ref.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[ref_log])
    model, log = build("deep", OPT), StepLog()
    tfpipe.fit(model, x, y, batch_size=16, epochs=1, **config.kwargs(),
               devices=tfpipe.default_devices(), shuffle=False, verbose=0, callbacks=[log])
    assert_same_training(ref, ref_log, model, log)


def test_fit_refuses_arguments_that_contradict_the_plan(planned):
    _, _, plan = planned
    x, y = data("deep")
    other = plan.best.micro_batches * 2
    with pytest.raises(tfpipe.PipelineError, match=f"micro_batches={other} disagrees with the plan"):
        tfpipe.fit(build("deep", OPT), x, y, plan=plan.best, micro_batches=other)


# the command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "mlp.keras"
    model = build("mlp", "adam")
    model.optimizer.build(model.trainable_variables)  # saved with its slots: loads silently
    model.save(path)
    return path


def test_cli_plan_prints_ranked_table_and_writes_png(saved_mlp, tmp_path):
    png = tmp_path / "out" / "plan.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "tfpipe", "plan", str(saved_mlp), "--batch", "8", "--devices",
         "2", "--memory-budget", "64KiB", "--plot", str(png), "--top", "5", "--repeats", "2"],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("Plan for 'mlp': batch 8 on up to 2 devices")
    assert "at micro-batch sizes 1, 2, 4, 8" in lines[1]
    assert lines[2].split() == ["#", "K", "M", "schedule", "recompute", "balance", "step",
                                "ms", "samples/s", "bubble", "peak/device", "fits"]
    assert [line.split()[0] for line in lines[4:9]] == ["1", "2", "3", "4", "5"]
    assert lines[-2].startswith("best: tfpipe.fit(model, ..., stages=")
    assert lines[-1] == f"wrote {png}"
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_cli_plan_errors(saved_mlp, tmp_path, capsys):
    assert cli.main(["plan", str(saved_mlp), "--batch", "8", "--devices", "2",
                     "--memory-budget", "2 gigs"]) == 2
    assert "Cannot read '2 gigs' as a size in bytes" in capsys.readouterr().err
    assert cli.main(["plan", str(tmp_path / "missing.keras"), "--batch", "8",
                     "--devices", "2"]) == 1
    assert "no model file" in capsys.readouterr().err
    status = cli.main(["plan", str(saved_mlp), "--batch", "8", "--devices", "2",
                       "--memory-budget", "1KiB", "--repeats", "1"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert err.startswith("tfpipe plan: error: No configuration fits memory_budget=1.0 KiB")
    assert "the smallest peak found is" in err
