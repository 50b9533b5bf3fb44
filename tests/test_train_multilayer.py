"""distnum train with chapter 6's nets: --hidden 12 8 --activation relu --weight-decay,
over Ray and in one process, resumed, recorded, checked."""

import json

import numpy as np
import pytest
from run_helpers import newest_checkpoint, reference_sha

from distnum.cli import run
from distnum.training import ConfigError, check_settings, train

DEEP = {"hidden": [12, 8], "activation": "relu", "weight_decay": 0.05, "optimizer": "adam"}


def test_a_deep_relu_run_over_ray_gives_the_bits_of_one_process(ray_session, tiny_mnist,
                                                                 tmp_path):  # fmt: skip
    summary = train(iters=8, workers=2, batch_size=10, quiet=True, data_dir=str(tiny_mnist),
                    out=str(tmp_path / "ray"), **DEEP)  # fmt: skip
    assert summary["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 8, **DEEP)
    assert summary["architecture"] == "784-12-8-10 relu"
    assert summary["params"] == 784 * 12 + 12 + 12 * 8 + 8 + 8 * 10 + 10
    recorded = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert {k: recorded[k] for k in ("hidden", "activation", "weight_decay", "weight_init_std",
                                     "optimizer", "lr")} == {
        "hidden": [12, 8], "activation": "relu", "weight_decay": 0.05,
        "weight_init_std": "relu", "optimizer": "adam", "lr": 0.001,
    }  # fmt: skip
    # the saved parameters are the net's, layer by layer
    with np.load(tmp_path / "ray" / "params.npz") as saved:
        assert list(saved) == ["W1", "b1", "W2", "b2", "W3", "b3"]
        assert saved["W2"].shape == (12, 8)


def test_a_deep_run_resumes_to_the_bits_of_one_go_and_keeps_its_net(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    options = {"batch_size": 10, "local": True, "quiet": True, "data_dir": str(tiny_mnist)}
    train(iters=5, out=str(out), **options, **DEEP)
    with pytest.raises(ConfigError, match=r"hidden=\[12, 9\] does not match the run"):
        train(iters=9, out=str(out), resume=True, hidden=[12, 9], **options)
    with pytest.raises(ConfigError, match=r"activation='sigmoid' does not match the run"):
        train(iters=9, out=str(out), resume=True, activation="sigmoid", **options)
    resumed = train(iters=9, out=str(out), resume=True, **options)
    assert resumed["resumed_from_step"] == 5 and resumed["hidden"] == [12, 8]
    assert resumed["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 9, **DEEP)
    # the weight decay is part of the loss: without it, other bits
    assert resumed["params_sha256"] != reference_sha(tiny_mnist, tmp_path, 9,
                                                     **{**DEEP, "weight_decay": 0.0})  # fmt: skip


def test_one_hidden_layer_is_the_chapters_net_however_it_is_given(tiny_mnist, tmp_path):
    as_list = train(iters=3, batch_size=10, hidden=[8], local=True, quiet=True,
                    data_dir=str(tiny_mnist), out=str(tmp_path / "list"))  # fmt: skip
    assert as_list["hidden"] == 8 and as_list["architecture"] == "784-8-10 sigmoid"
    assert as_list["weight_init_std"] == 0.01
    assert as_list["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 3)


def test_named_initial_weights_are_recorded_as_one_name(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    first = train(iters=3, batch_size=10, hidden=[8, 8], activation="relu",
                  weight_init_std="He", local=True, quiet=True, data_dir=str(tiny_mnist),
                  out=str(out))  # fmt: skip
    assert first["weight_init_std"] == "relu"
    resumed = train(iters=5, resume=True, weight_init_std="relu", local=True, quiet=True,
                    data_dir=str(tiny_mnist), out=str(out))  # fmt: skip
    assert resumed["resumed_from_step"] == 3


def test_checkpoints_record_the_architecture(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    train(iters=4, batch_size=10, local=True, quiet=True, data_dir=str(tiny_mnist),
          out=str(out), **DEEP)  # fmt: skip
    saved, _ = newest_checkpoint(out)
    assert {k: saved.settings[k] for k in DEEP} == DEEP
    with pytest.raises(ValueError, match="settings activation have no value"):
        check_settings({**saved.settings, "activation": None})
    assert saved.flat_params.size == 784 * 12 + 12 + 12 * 8 + 8 + 8 * 10 + 10


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hidden": []}, r"hidden=\[\] must be whole numbers >= 1, one per hidden layer"),
        ({"hidden": [10, 0]}, r"hidden=\[10, 0\] must be whole numbers >= 1"),
        ({"activation": "tanh"}, "activation='tanh' is unknown; choose one of sigmoid, relu"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1 must be a finite number >= 0"),
        ({"weight_init_std": "kaiming"}, "weight_init_std='kaiming' is unknown"),
    ],
)
def test_a_bad_architecture_is_refused_before_anything_starts(options, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(iters=3, local=True, out=str(tmp_path / "run"), **options)
    assert not (tmp_path / "run").exists()


def test_gradcheck_and_bench_take_the_architecture(mnist_dir, capsys):
    common = ["--data-dir", str(mnist_dir), "--hidden", "20", "10", "--activation", "relu"]
    assert run(["gradcheck", *common, "--full-sample", "50", "--weight-decay", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "784-20-10-10 relu" in out and out.rstrip().endswith("ok")
    assert "W3" in out
    assert run(["bench", *common, "--full-sample", "20", "--repeat", "2", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["engines"]
    assert row["architecture"] == "784-20-10-10 relu" and row["hidden"] == [20, 10]
    assert row["params"] == 784 * 20 + 20 + 20 * 10 + 10 + 10 * 10 + 10
    assert run(["bench", *common, "--weight-decay", "-1"]) == 2
    assert "--weight-decay -1.0 must be a finite number >= 0" in capsys.readouterr().err
    assert run(["gradcheck", *common, "--weight-init-std", "0"]) == 2
    assert "--weight-init-std 0.0 must be finite, > 0" in capsys.readouterr().err
