"""The chapter-6 optimizers on the flat vector, against the book's per-array algorithms
written out here; their state through save and load, and through a resumed run."""

from __future__ import annotations

import numpy as np
import pytest
from run_helpers import newest_checkpoint, reference_sha

from distnum.optimizers import OPTIMIZERS, make_optimizer
from distnum.training import ConfigError, train

SHAPES = {"W1": (4, 3), "b1": (3,)}


def reference_update(name: str, lr: float, params: dict, grads: dict, state: dict) -> None:
    """The book's common/optimizer.py update, array by array."""
    state["iter"] = state.get("iter", 0) + 1
    for key in params:
        g = grads[key]
        if name == "sgd":
            params[key] -= lr * g
        elif name == "momentum":
            v = state.setdefault(("v", key), np.zeros_like(g))
            state["v", key] = 0.9 * v - lr * g
            params[key] += state["v", key]
        elif name == "nesterov":
            v = state.setdefault(("v", key), np.zeros_like(g))
            v *= 0.9
            v -= lr * g
            params[key] += 0.9 * 0.9 * v
            params[key] -= (1 + 0.9) * lr * g
        elif name in ("adagrad", "rmsprop"):
            h = state.setdefault(("h", key), np.zeros_like(g))
            if name == "adagrad":
                h += g * g
            else:
                h *= 0.99
                h += (1 - 0.99) * g * g
            params[key] -= lr * g / (np.sqrt(h) + 1e-7)
        else:  # adam
            m = state.setdefault(("m", key), np.zeros_like(g))
            v = state.setdefault(("v", key), np.zeros_like(g))
            t = state["iter"]
            lr_t = lr * np.sqrt(1.0 - 0.999**t) / (1.0 - 0.9**t)
            m += (1 - 0.9) * (g - m)
            v += (1 - 0.999) * (g**2 - v)
            params[key] -= lr_t * m / (np.sqrt(v) + 1e-7)


def gradients(steps: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.normal(size=15) for _ in range(steps)]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_gives_the_books_bits(name):
    flat = np.random.default_rng(0).normal(size=15)
    params = {"W1": flat[:12].reshape(4, 3).copy(), "b1": flat[12:].copy()}
    optimizer = make_optimizer(name, flat.size, lr=0.05)
    state: dict = {}
    for grad in gradients(6):
        optimizer.update(flat, grad)
        grads = {"W1": grad[:12].reshape(4, 3), "b1": grad[12:]}
        reference_update(name, 0.05, params, grads, state)
    expected = np.concatenate([params["W1"].ravel(), params["b1"]])
    assert flat.tobytes() == expected.tobytes()
    assert optimizer.iterations == 6


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_saved_and_loaded_goes_on_bit_for_bit(name):
    start = np.random.default_rng(0).normal(size=15)
    straight, resumed = start.copy(), start.copy()
    first = make_optimizer(name, 15)
    for grad in gradients(6):
        first.update(straight, grad)
    before = make_optimizer(name, 15)
    for grad in gradients(6)[:3]:
        before.update(resumed, grad)
    after = make_optimizer(name, 15)
    after.load_state({k: v.copy() for k, v in before.state().items()})
    for grad in gradients(6)[3:]:
        after.update(resumed, grad)
    assert resumed.tobytes() == straight.tobytes()


def test_a_bad_state_is_refused_with_what_is_wrong():
    adam = make_optimizer("adam", 15)
    good = adam.state()
    with pytest.raises(ValueError, match=r"expected \['iterations', 'm', 'v'\]"):
        adam.load_state({"m": good["m"], "iterations": good["iterations"]})
    with pytest.raises(ValueError, match=r"m is float64 \(14,\); expected float64 \(15,\)"):
        adam.load_state({**good, "m": np.zeros(14)})
    with pytest.raises(ValueError, match="v is not finite"):
        adam.load_state({**good, "v": np.full(15, np.nan)})
    with pytest.raises(ValueError, match="iterations must be a count"):
        adam.load_state({**good, "iterations": np.array(-1)})
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'; choose one of sgd, "):
        make_optimizer("adamw", 15)


def test_the_book_defaults_and_the_chapter_4_rate():
    assert make_optimizer("adam", 3).lr == 0.001 and make_optimizer("momentum", 3).lr == 0.01
    assert make_optimizer("sgd", 3).lr == 0.1


# --- in a training run -------------------------------------------------------------------


def test_a_run_with_adam_resumed_over_ray_gives_the_bits_of_one_go(ray_session, tiny_mnist,
                                                                  tmp_path):  # fmt: skip
    out = tmp_path / "run"
    first = train(iters=9, optimizer="adam", workers=2, batch_size=10, hidden=8, quiet=True,
                  data_dir=str(tiny_mnist), out=str(out))  # fmt: skip
    assert first["optimizer"] == "adam" and first["lr"] == 0.001  # the book's default rate
    saved, _ = newest_checkpoint(out)
    assert set(saved.optimizer_state) == {"m", "v", "iterations"}
    assert int(saved.optimizer_state["iterations"]) == 9
    resumed = train(iters=20, resume=True, workers=2, quiet=True, data_dir=str(tiny_mnist),
                    out=str(out))  # fmt: skip
    assert resumed["resumed_from_step"] == 9 and resumed["optimizer"] == "adam"
    assert resumed["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 20, optimizer="adam")
    assert resumed["params_sha256"] != reference_sha(tiny_mnist, tmp_path, 20)  # not sgd's


def test_an_optimizer_is_checked_and_kept_by_a_resumed_run(tiny_mnist, tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer='adamw' is unknown; choose one of sgd, "):
        train(iters=6, optimizer="adamw", local=True, data_dir=str(tiny_mnist),
              out=str(tmp_path / "bad"))  # fmt: skip
    out = tmp_path / "run"
    train(iters=6, optimizer="rmsprop", local=True, batch_size=10, hidden=8, quiet=True,
          data_dir=str(tiny_mnist), out=str(out))  # fmt: skip
    with pytest.raises(ConfigError, match=r"optimizer='momentum' does not match the run"):
        train(iters=12, optimizer="momentum", resume=True, local=True, quiet=True,
              data_dir=str(tiny_mnist), out=str(out))  # fmt: skip
