"""Faults: checkpoints and bit-identical resume, a worker actor's process killed, the driver
killed with SIGKILL, divergence, and bad input.

Real processes throughout: `distnum train` runs as a subprocess with its own Ray, a worker
actor's process is killed with SIGKILL, the driver is killed with SIGKILL.

Bad inputs tried (each a one-line error, exit status 2, before Ray starts):
    --lr 0, --lr -1, --lr abc, --lr nan; --batch-size 0, a batch larger than the training set;
    --iters 0; --h 0, --h=-1e-4; --workers 0; --engine slow; a --data-dir without MNIST;
    an --out that is a file; --resume from a folder with no checkpoint, with a checkpoint whose
    checksum is wrong, with a truncated one, and with one of another --hidden.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import psutil
import pytest
from idx_files import write_fake_mnist
from run_helpers import (
    TINY,
    checkpoint_steps,
    kill_leftovers,
    newest_checkpoint,
    reference_sha,
    rewrite_manifest,
    start_train,
    summary_of,
    wait_until,
)

from distnum import checkpoint as checkpoints
from distnum.training import Diverged, train

# --- checkpoints and resume ---------------------------------------------------------------


def test_checkpoints_are_atomic_checked_and_pickle_free(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    train(iters=17, checkpoint_every=5, batch_size=10, hidden=8, local=True, quiet=True,
          data_dir=str(tiny_mnist), out=str(out))  # fmt: skip
    assert checkpoint_steps(out) == [15, 17]  # every 5 steps and at the end; the newest 2 kept
    folder = checkpoints.directory(out)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files
    manifest = json.loads((folder / "step-0000017.json").read_text())
    assert manifest["step"] == 17 and manifest["rng_state"]["bit_generator"] == "PCG64"
    with np.load(folder / manifest["data"], allow_pickle=False) as arrays:
        assert arrays["step_losses"].shape == (17,)
        assert arrays["epochs"].shape == (3, 4)  # steps 6, 12 and 17
        with np.load(out / "params.npz", allow_pickle=False) as params:
            final = np.concatenate([params[k].ravel() for k in ("W1", "b1", "W2", "b2")])
        assert np.array_equal(arrays["flat_params"], final)


def test_resume_gives_the_same_bits_and_metrics(ray_session, tiny_mnist, tmp_path):
    out = tmp_path / "run"
    train(iters=9, workers=2, batch_size=10, hidden=8, quiet=True, data_dir=str(tiny_mnist),
          out=str(out))  # fmt: skip
    resumed = train(iters=20, resume=True, workers=2, quiet=True, data_dir=str(tiny_mnist),
                    out=str(out))  # fmt: skip
    assert resumed["resumed_from_step"] == 9 and resumed["hidden"] == 8
    assert resumed["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 20)
    reference = tmp_path / "reference-20" / "metrics.jsonl"
    ours = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in reference.read_text().splitlines()]

    def steps(records):
        return [(r["step"], r["loss"]) for r in records if "loss" in r]

    def epochs(records):
        return [(r["step"], r["train_acc"], r["test_acc"]) for r in records if "test_acc" in r]

    assert steps(ours) == steps(theirs) and [s for s, _ in steps(ours)] == list(range(1, 21))
    assert epochs(ours) == epochs(theirs) and [s for s, *_ in epochs(ours)] == [6, 12, 18, 20]


def test_a_damaged_newest_checkpoint_is_skipped(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    train(iters=12, checkpoint_every=5, batch_size=10, hidden=8, local=True, quiet=True,
          data_dir=str(tiny_mnist), out=str(out))  # fmt: skip
    newest = checkpoints.directory(out) / "step-0000012.npz"
    newest.write_bytes(newest.read_bytes()[:-10])
    resumed = train(iters=20, resume=True, local=True, quiet=True, data_dir=str(tiny_mnist),
                    out=str(out))  # fmt: skip
    assert resumed["resumed_from_step"] == 10
    assert "skipped 1 newer" in capsys.readouterr().err
    assert resumed["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 20)


def drop_mark(manifest: dict) -> None:
    manifest.pop("fast_engine")


def mark_0_2(manifest: dict) -> None:
    manifest["fast_engine"] = 2


# which earlier fast engine wrote a checkpoint (its mark), the run's settings, and the line
# that refuses it, or None for a run whose bits that engine did not change (it goes on)
EARLIER_ENGINES = {
    "0.1 fast": (drop_mark, {"engine": "fast"},
                 "fast engine of distnum 0.1, before its delta form"),
    "0.1 backprop": (drop_mark, {"engine": "backprop"}, None),
    "0.2 relu": (mark_0_2, {"activation": "relu"},
                 "fast engine of distnum 0.2, before it made ReLU's kinks"),
    "0.2 sigmoid": (mark_0_2, {"activation": "sigmoid"}, None),
}  # fmt: skip


@pytest.mark.parametrize("case", EARLIER_ENGINES)
def test_a_checkpoint_of_an_earlier_fast_engine_is_refused_by_name(case, tiny_mnist, tmp_path):
    """A checkpoint of distnum 0.1 lacks the fast engine's mark; one of 0.2 has mark 2, before
    the first layer's ReLU kinks were exact (0.3). A run whose bits that engine computed
    otherwise would go on with other bits than a run done in one go, so it is refused with
    what to do; the others (backprop, a sigmoid net in 0.2) go on to the bits of one go."""
    mark, settings, refusal = EARLIER_ENGINES[case]
    out = tmp_path / "run"
    train(iters=12, checkpoint_every=5, batch_size=10, hidden=8, local=True, quiet=True,
          data_dir=str(tiny_mnist), out=str(out), **settings)  # fmt: skip
    for manifest in checkpoints.directory(out).glob("*.json"):
        rewrite_manifest(manifest, mark)
    before = {p.name: p.read_bytes() for p in checkpoints.directory(out).iterdir()}
    resume = start_train("--resume", str(out), "--iters", "20", "--local", "--quiet")
    _, stderr = resume.communicate(timeout=120)
    if refusal is None:
        assert resume.returncode == 0, stderr
        assert summary_of(out)["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 20,
                                                                **settings)  # fmt: skip
        return
    assert resume.returncode == 2, stderr
    (line,) = stderr.splitlines()
    release = case.split()[0]
    assert refusal in line
    assert f"finish the run with distnum {release}, or start it again with --overwrite" in line
    assert {p.name: p.read_bytes() for p in checkpoints.directory(out).iterdir()} == before


# --- processes killed ------------------------------------------------------------------------


def test_a_killed_worker_is_replaced_and_its_step_redone(
    tiny_mnist, tmp_path, joining, tests_ray_workers
):
    out = tmp_path / "run"
    run = start_train("--iters", "300", "--workers", "2", "--quiet", "--data-dir",
                      str(tiny_mnist), "--out", str(out), *TINY, *joining)  # fmt: skip
    metrics = out / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and metrics.read_text().count("test_acc") >= 3, 180, run)
    victim = tests_ray_workers()[0]
    victim.send_signal(signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    summary = summary_of(out)
    assert summary["worker_restarts"] >= 1
    assert summary["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 300)


def test_beyond_the_restarts_a_clear_error_and_the_checkpoint_kept(
    tiny_mnist, tmp_path, joining, tests_ray_workers
):
    out = tmp_path / "run"
    run = start_train("--iters", "100000", "--workers", "2", "--quiet", "--data-dir",
                      str(tiny_mnist), "--out", str(out), "--max-worker-restarts", "0",
                      *TINY, *joining)  # fmt: skip
    wait_until(lambda: len(checkpoint_steps(out)) >= 2, 180, run)
    tests_ray_workers()[0].send_signal(signal.SIGKILL)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1, stderr
    assert "more than --max-worker-restarts 0" in stderr
    assert len(stderr.strip().splitlines()[-1]) > 0
    saved, note = newest_checkpoint(out)
    assert saved.step >= 6 and note is None


def test_driver_killed_with_sigkill_then_resume(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    args = ["--workers", "2", "--quiet", "--data-dir", str(tiny_mnist), *TINY]
    run = start_train("--iters", "200", "--out", str(out), "--checkpoint-every", "20", *args)
    driver = psutil.Process(run.pid)
    wait_until(lambda: len(checkpoint_steps(out)) >= 2 and checkpoint_steps(out)[-1] >= 60,
               180, run)  # fmt: skip
    ray_processes = driver.children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    kill_leftovers(ray_processes)
    assert run.returncode == -signal.SIGKILL
    # the step's shared memory is named only until the actors have mapped it
    assert not list(Path("/dev/shm").glob(f"distnum-step-{run.pid}-*"))
    resumed = start_train("--resume", str(out), "--iters", "200", *args)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    summary = summary_of(out)
    assert summary["resumed_from_step"] >= 60
    assert summary["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 200)


# --- divergence -----------------------------------------------------------------------------


def test_divergence_stops_at_the_step_and_keeps_the_last_good_checkpoint(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    # 3e307: the parameters grow for a few steps, then the logits overflow
    with pytest.raises(Diverged, match=r"diverged at step (\d+): the loss is inf with lr=3e\+307"
                       ) as failure:  # fmt: skip
        train(iters=100, lr=3e307, checkpoint_every=1, batch_size=10, hidden=8, local=True,
              quiet=True, data_dir=str(tiny_mnist), out=str(out))  # fmt: skip
    step = int(str(failure.value).split()[3].rstrip(":"))
    saved, note = newest_checkpoint(out)
    assert note is None and saved.step == step - 1 > 0
    assert np.isfinite(saved.flat_params).all()
    assert f"last good checkpoint: step {step - 1}" in str(failure.value)


def test_divergence_from_the_command_line(tiny_mnist, tmp_path):
    run = start_train("--local", "--lr", "1e308", "--iters", "50", "--data-dir",
                      str(tiny_mnist), "--out", str(tmp_path / "run"), *TINY)  # fmt: skip
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1, stderr
    assert "diverged at step 1: the loss is inf with --lr 1e+308" in stderr


# --- bad input ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_mnist, tmp_path_factory) -> Path:
    """A run whose only checkpoint is its end (6 steps, one epoch)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(iters=6, batch_size=10, hidden=8, lr=0.5, local=True, quiet=True,
          data_dir=str(tiny_mnist), out=str(out))  # fmt: skip
    assert checkpoint_steps(out) == [6]
    return out


def damaged_copy(finished_run: Path, tmp_path: Path, damage) -> Path:
    out = tmp_path / "damaged"
    shutil.copytree(finished_run, out)
    data = checkpoints.directory(out) / "step-0000006.npz"
    data.write_bytes(damage(data.read_bytes()))
    return out


def flip_a_byte(data: bytes) -> bytes:
    return data[:100] + bytes([data[100] ^ 1]) + data[101:]


BAD_INPUTS = {
    "lr zero": (["--lr", "0"], "--lr 0.0 must be finite, > 0"),
    "lr negative": (["--lr", "-1"], "--lr -1.0 must be finite, > 0"),
    "lr not a number": (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    "lr nan": (["--lr", "nan"], "--lr nan must be finite, > 0"),
    "batch size 0": (["--batch-size", "0"], "argument --batch-size: 0 must be at least 1"),
    "batch too large": (["--batch-size", "61"], "--batch-size 61 is larger than the training set"),
    "iters 0": (["--iters", "0"], "argument --iters: 0 must be at least 1"),
    "h zero": (["--h", "0"], "--h 0.0 must be finite, > 0 and <= 1"),
    "h negative": (["--h=-1e-4"], "--h -0.0001 must be finite, > 0 and <= 1"),
    "workers 0": (["--workers", "0"], "argument --workers: 0 must be at least 1"),
    "unknown engine": (["--engine", "slow"], "argument --engine: invalid choice: 'slow'"),
    "data dir without MNIST": (["--data-dir", "{empty}"], "has no train-images-idx3-ubyte"),
    "out is a file": (["--out", "{file}"], "is a file; give a folder"),
    "resume without checkpoint": (["--resume", "{empty}"], "has no checkpoint"),
    "resume bad checksum": (["--resume", "{flipped}"], "checksum does not match"),
    "resume truncated": (["--resume", "{truncated}"], "checksum does not match"),
    "resume other hidden": (
        ["--resume", "{finished}", "--hidden", "20"],
        "--hidden 20 does not match the run",
    ),
    "resume lr given as the default": (
        ["--resume", "{finished}", "--lr", "0.1"],
        "--lr 0.1 does not match the run",
    ),
    "resume overwrite too": (
        ["--resume", "{finished}", "--overwrite"],
        "--resume and --overwrite contradict each other",
    ),
    "seed negative": (["--seed", "-1"], "argument --seed: -1 must be at least 0"),
    "h huge": (["--h", "1e10"], "--h 10000000000.0 must be finite, > 0 and <= 1"),
    "h vanishing": (["--h", "1e-300"], "--h 1e-300 vanishes next to weights of size"),
    "weight init nan": (["--weight-init-std", "nan"], "--weight-init-std nan must be finite"),
    "weight init overflowing": (
        ["--weight-init-std", "1e308"],
        "--weight-init-std 1e+308 makes the initial weights or loss overflow",
    ),
    "out holding a run": (["--out", "{finished}"], "holds a run already; go on with it with"),
    "hidden beyond memory": (
        ["--hidden", "100000000", "--batch-size", "10"],
        "--hidden 100000000 makes a net of 79,500,000,010 parameters, whose arrays need about",
    ),
    "weight init huge": (["--weight-init-std", "1e300"], "--weight-init-std 1e+300 makes"),
    "RAY_ADDRESS garbage": (
        [],
        "RAY_ADDRESS='garbage' is not a Ray address",
        {"RAY_ADDRESS": "garbage"},
    ),
    "address garbage": (["--address", "not an address"], "--address 'not an address' is not"),
    "ray client host unknown": (
        ["--address", "ray://nohost.invalid:10001"],
        "cannot reach a Ray cluster at nohost.invalid:10001",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_before_ray(case, tiny_mnist, finished_run, tmp_path):
    args, expected, *env = BAD_INPUTS[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    places = {
        "empty": tmp_path / "empty",
        "file": tmp_path / "a-file",
        "finished": finished_run,
        "flipped": damaged_copy(finished_run, tmp_path / "f", flip_a_byte),
        "truncated": damaged_copy(finished_run, tmp_path / "t", lambda d: d[: len(d) // 2]),
    }
    args = [a.format(**places) if a.startswith("{") else a for a in args]
    if "--resume" not in args and "--batch-size" not in args:
        args += TINY
    if "--data-dir" not in args:
        args += ["--data-dir", str(tiny_mnist)]
    if "--out" not in args and "--resume" not in args:
        args += ["--out", str(tmp_path / "out")]
    # Ray's own lines kept (DISTNUM_RAY_LOGS=1), so that its start would show
    env = {**os.environ, "DISTNUM_RAY_LOGS": "1", **(env[0] if env else {})}
    iters = ["--iters", "50"] if "--iters" not in args and "--resume" not in args else []
    run = start_train(*iters, *args, env=env)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], stderr
    assert "Traceback" not in stderr and "Token authentication" not in stderr  # Ray never began
    assert "RAY_AUTH_MODE" not in stderr  # no token hint where tokens are not the problem


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_a_refused_run_leaves_the_folder_byte_for_byte(finished_run, tiny_mnist, tmp_path):
    """A second run on a finished run's folder, and a resume on other data, are refused
    (exit 2) and change nothing there, its lock file's pid included."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / ".distnum.lock").write_text("12345\n")  # as the run that wrote there left it
    before = snapshot(out)
    other = tmp_path / "other-data"
    write_fake_mnist(other, n_train=70, n_test=20)
    for args in (["--out", str(out), "--iters", "5", "--data-dir", str(tiny_mnist), *TINY],
                 ["--resume", str(out), "--data-dir", str(other)]):  # fmt: skip
        _, stderr = (run := start_train(*args, "--local", "--quiet")).communicate(timeout=60)
        assert run.returncode == 2, stderr
        assert snapshot(out) == before, args


def test_a_run_killed_before_its_first_checkpoint_is_started_again(tiny_mnist, tmp_path):
    """SIGKILL before the first checkpoint, then what a SIGKILL while writing it leaves (the
    arrays without their manifest, a temporary file): --resume says there is no whole
    checkpoint and to start again, and the command that started the run does, to the bits
    of a run done in one go; neither points at the other in a circle."""
    out = tmp_path / "run"
    args = ["--local", "--iters", "400", "--checkpoint-every", "300", "--quiet", "--data-dir",
            str(tiny_mnist), "--out", str(out), *TINY]  # fmt: skip
    run = start_train(*args)
    metrics = out / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and metrics.read_text().count('"loss"') >= 20, 120, run)
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    assert checkpoint_steps(out) == []
    folder = checkpoints.directory(out)
    folder.mkdir(exist_ok=True)
    (folder / "step-0000300.npz").write_bytes(b"PK\x03\x04 half an archive")
    (folder / ".step-0000300.json.a1b2c3.tmp").write_text('{"step": 3')
    resumed = start_train("--resume", str(out), "--local", "--quiet")
    _, stderr = resumed.communicate(timeout=60)
    assert resumed.returncode == 2, stderr
    (line,) = stderr.splitlines()
    assert "holds no whole checkpoint" in line and "without --resume" in line
    again = start_train(*args)
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert "stopped before its first checkpoint; starting again there" in stderr
    assert summary_of(out)["params_sha256"] == reference_sha(tiny_mnist, tmp_path, 400)
    assert checkpoint_steps(out) == [300, 400]
    assert sorted(p.name for p in folder.iterdir()) == [
        "step-0000300.json",
        "step-0000300.npz",
        "step-0000400.json",
        "step-0000400.npz",
    ]
