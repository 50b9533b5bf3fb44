"""The examples run, and print the notebook's values."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args, env=None):
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.parametrize(
    "name, printed",
    [
        (
            "ch4_2_loss_functions.py",
            [
                "Example 1: 0.0975",
                "Example 2: 0.5975",
                "Example 1: 0.510825457099",
                "Example 2: 2.302584092995",
            ],
        ),
        (
            "ch4_3_numerical_differentiation.py",
            ["0.1999999999990898", "0.2999999999986347", "6.00000000000378", "7.999999999999119"],
        ),
        (
            "ch4_4_gradient_descent.py",
            [
                "[6. 8.]",
                "[0. 4.]",
                "[6. 0.]",
                "[-6.11110793e-10  8.14814391e-10]",
                "[-2.58983747e+13 -1.29524862e+12]",
                "[-2.99999994  3.99999992]",
            ],
        ),
        (
            "ch4_4_2_simple_net.py",
            [
                "p = [-0.65721714 -0.78458665 -0.38992879]",
                "np.argmax(p) = 2",
                "net.loss(x, t) = 0.89173",
            ],
        ),
    ],
)
def test_example_prints_the_notebook_values(name, printed, mnist_dir):
    out = run_example(name, env={"DISTNUM_DATA": str(mnist_dir)})
    for value in printed:
        assert value in out


def test_two_layer_net_example_trains(mnist_dir):
    out = run_example(
        "ch4_5_two_layer_net.py", "--iters", "3", env={"DISTNUM_DATA": str(mnist_dir)}
    )
    assert "net.params['W1'].shape = (784, 100)" in out
    assert "grads['W1'] = (784, 100)" in out
    assert "iter 0: loss" in out and "iter 2: loss" in out


def test_multi_layer_net_example_trains_as_backprop_does(mnist_dir, tmp_path):
    out = run_example(
        "ch6_multi_layer_net.py", "--iters", "200", "--hidden", "16", "16", "--local",
        "--out", str(tmp_path), env={"DISTNUM_DATA": str(mnist_dir)},
    )  # fmt: skip
    assert "784-16-16-10 relu, Adam lr 0.001, batch 100, 200 steps" in out
    gap = float(out.rsplit("central differences minus backprop: ", 1)[1])
    assert abs(gap) <= 0.01, out
    accuracies = [float(line.split()[3]) for line in out.splitlines()
                  if line.startswith(("fast ", "backprop "))]  # fmt: skip
    assert len(accuracies) == 2 and min(accuracies) > 0.8, out  # it learnt
