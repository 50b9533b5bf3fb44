"""The cost model of a step (`distnum bench --model`): its formula, and a run of it on this
machine's Ray (across hosts: tests/test_cluster.py)."""

from __future__ import annotations

import json
import math
import multiprocessing

import numpy as np
import pytest

from distnum import cost_model
from distnum.cli import run
from distnum.models import TwoLayerNet
from distnum.options import option


def a_model(**changes) -> dict:
    model = {
        "params": 1000, "cores": 2, "compute_s": 0.010, "fixed_s": 0.002, "slowdown": 1.2,
        "host_fixed_s": 0.001,
        "overhead_s": {1: 0.0003, 2: 0.0004, 4: 0.0008, 8: 0.002},
        "step_compute_s": {1: 0.010, 2: 0.0072, 4: 0.0079, 8: 0.013},
    }  # fmt: skip
    return {**model, **changes}


def test_a_step_is_its_compute_plus_what_the_idle_engine_measured():
    model = a_model()
    assert cost_model.step_seconds(model, 1) == pytest.approx(0.010 + 0.0003)
    assert cost_model.step_seconds(model, 8) == pytest.approx(0.013 + 0.002)


def test_the_closed_form_shares_the_work_that_divides_and_the_cores():
    model = a_model()
    assert cost_model.closed_form_seconds(model, 1, 2) == pytest.approx(0.010)
    # each actor: its share of the work that divides, and all of the fixed work
    assert cost_model.closed_form_seconds(model, 2, 2) == pytest.approx((0.004 + 0.002) * 1.2)
    # more actors than cores: each computes less, but on a share of a core
    assert cost_model.closed_form_seconds(model, 8, 2) == pytest.approx((0.001 + 0.002) * 4 * 1.2)


def test_the_fixed_work_is_fitted_to_a_shards_cpu_time():
    total, fixed = 0.012, 0.0015
    cpu = {n: (total - fixed) / n + fixed for n in (1, 2, 4, 8)}
    assert cost_model.fitted_fixed_seconds(cpu) == pytest.approx(fixed)
    noisy = {n: s * (1.03 if n % 4 == 0 else 0.98) for n, s in cpu.items()}
    assert cost_model.fitted_fixed_seconds(noisy) == pytest.approx(fixed, rel=0.5)
    assert cost_model.fitted_fixed_seconds({1: total}) == 0.0  # nothing to fit it to
    # shards cheaper than their share: no negative fixed work; dearer than the whole: no more
    # fixed work than the whole
    assert cost_model.fitted_fixed_seconds({1: total, 2: total / 3}) == 0.0
    assert cost_model.fitted_fixed_seconds({1: total, 2: 1.2 * total}) == total


def test_the_compute_of_a_step_in_processes_of_its_own(mnist, monkeypatch):
    """K: real spawned processes, one per shard, released together each step, for one set of
    shards after the other; none is left."""
    (x, t), _ = mnist
    net = TwoLayerNet(784, 10, 10, seed=0)
    batches = np.arange(600).reshape(6, 100)  # 1 warm-up step and 5 timed
    whole = np.arange(net.layout.size)
    halves = np.array_split(whole, 2)
    monkeypatch.setattr(cost_model, "WARMUP_STEPS", 1)
    measured = cost_model.compute_seconds(net.layout, net.flat_params, x[:600], t[:600],
                                          batches, [[whole], halves], 1e-4)  # fmt: skip
    assert len(measured) == 2
    for step_s, cpu_s in measured:
        assert 0 < cpu_s < 1 and cpu_s < step_s * 1.5
    # a shard that fails (an index past the parameters) stops them all, with its reason: the
    # process waiting for the next set too
    bad = [np.array([net.layout.size])]
    with pytest.raises(RuntimeError, match=r"1/2 shards: ValueError: parameter indices"):
        cost_model.compute_seconds(net.layout, net.flat_params, x[:600], t[:600], batches,
                                   [bad, halves], 1e-4)  # fmt: skip
    assert multiprocessing.active_children() == []


def test_more_hosts_pay_until_the_drivers_link_carries_the_parameters_to_each():
    model = a_model()
    bandwidth = 1e9
    one = (0.008 / 2 + 0.002) * 1.2 + 0.0004
    four = (0.008 / 8 + 0.002) * 1.2 + 0.0004 + 3 * (0.001 + (8000 + 8000 / 4) / bandwidth)
    assert cost_model.host_step_seconds(model, 1, bandwidth) == pytest.approx(one)
    assert cost_model.speedup(model, 4, bandwidth) == pytest.approx(one / four)
    big = a_model(params=10**8)  # 800 MB a copy: no host is worth adding
    assert cost_model.speedup(big, 2, bandwidth) < 1


def test_the_host_cost_splits_into_a_fixed_part_and_bytes_over_the_link_measured():
    models = []
    for params, delay in ((1000, 0.0012), (11000, 0.0022)):  # 1 ms per 80 kB more
        two = {2: 8.0 * params}
        models.append(a_model(params=params, host_delay_s=delay, bytes_to_each_host=two,
                              bytes_from_each_host={2: 0.0}))  # fmt: skip
    cost_model.project_hosts(models)
    for m in models:
        assert m["host_fixed_s"] == pytest.approx(0.0011)
        assert m["bytes_per_s_here"] == pytest.approx(80_000 / 0.001)
        assert m["predicted_speedup"]["10 Gbit/s"][1] == pytest.approx(1.0)


def test_bench_model_on_this_machine_prints_and_plots(bench_mnist, ray_session, tmp_path, capsys,
                                                      monkeypatch):  # fmt: skip
    png = tmp_path / "model.png"
    status = run(["bench", "--model", "--data-dir", str(bench_mnist), "--hidden-sizes", "10",
                   "--workers", "1", "--steps", "4", "--plot", str(png), "--json"])  # fmt: skip
    assert status == 0
    assert option("data_dir") == "data_dir="  # the command's flag style ended with it
    (model,) = json.loads(capsys.readouterr().out)["model"]
    assert model["hidden"] == 10 and model["params"] == 784 * 10 + 10 + 10 * 10 + 10
    assert list(model["overhead_s"]) == ["1", "2"]  # 1 and the 2 cores always
    assert list(model["measured_steps_per_s"]) == ["1", "2"]
    assert list(model["step_compute_s"]) == list(model["shard_cpu_s"]) == ["1", "2"]
    assert model["compute_s"] == model["step_compute_s"]["1"]
    assert 0 <= model["fixed_s"] <= model["shard_cpu_s"]["1"]
    assert 0 < model["slowdown"] < math.inf  # a ratio of times: bench's figure, not bounded here
    assert model["closed_form_error"]["2"] == pytest.approx(0.0)  # s: K(cores) in closed form
    for n, predicted in model["predicted_steps_per_s"].items():
        step = model["step_compute_s"][n] + model["overhead_s"][n]
        assert predicted == pytest.approx(1 / step)
        measured = model["measured_steps_per_s"][n]
        assert model["prediction_error"][n] == pytest.approx(predicted / measured - 1)
    assert "two_host_overhead_s" not in model  # one node only
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
