"""distnum in Jupyter, in a real IPython kernel: the example notebook top to bottom, and its
Japanese version, and a session in which the user started Ray (that Ray used and kept, a second
run, an interrupt)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient
from ray_log_lines import ray_log_lines

TESTS = Path(__file__).resolve().parent
NOTEBOOK = TESTS.parent / "examples" / "ch4_numerical_gradient.ipynb"
NOTEBOOK_JA = NOTEBOOK.with_name("ch4_numerical_gradient.ja.ipynb")
NOTEBOOK_ITERS = 200  # the notebook's DISTNUM_NOTEBOOK_ITERS here: a few seconds of training
NOTEBOOK_JA_ITERS = 20  # the Japanese one's: the same code, so a few steps are enough
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
# the losses the notebook prints itself, to 4 significant digits
LOSS_LINES = [
    "Example 1: 0.09750", "Example 2: 0.5975", "Example 1: 0.5108", "Example 2: 2.303",
    "one-hot labels:    2.303", "labels as indices: 2.303", "net.loss(x, t) = 0.8917",
]  # fmt: skip


def output_text(outputs: list[dict]) -> str:
    """Everything a cell's outputs show as text: streams, plain-text values, errors."""
    parts = []
    for output in outputs:
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
        parts.extend([output.get("ename", ""), output.get("evalue", "")])
        parts.extend(output.get("traceback", []))
    return "\n".join(parts)


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def cell_with(notebook: nbformat.NotebookNode, code: str) -> nbformat.NotebookNode:
    (cell,) = [c for c in code_cells(notebook) if code in c.source]
    return cell


def execute(notebook: nbformat.NotebookNode, cwd: Path) -> None:
    """Run a notebook saved without outputs in a new kernel, in cwd; a cell that raises fails the
    test here (CellExecutionError)."""
    assert all(c.outputs == [] and c.execution_count is None for c in code_cells(notebook))
    started = time.monotonic()
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()  # fmt: skip
    print(f"notebook: {time.monotonic() - started:.1f} s")


def printed_run_folder(notebook: nbformat.NotebookNode) -> Path | None:
    """The folder the notebook said its run goes to, if it got that far."""
    printed = output_text(cell_with(notebook, "tempfile.mkdtemp(").outputs)
    found = re.search(r"^the run goes to (.+)$", printed, re.MULTILINE)
    return Path(found[1]) if found else None


def check_the_run(notebook: nbformat.NotebookNode, iters: int, out: Path) -> str:
    """What the notebook shows, run to the end; returns what its training cell printed."""
    printed = [output_text(cell.outputs) for cell in code_cells(notebook)]
    lines = "\n".join(printed).splitlines()
    assert [line for line in LOSS_LINES if line not in lines] == []

    training = cell_with(notebook, "distnum.train(")
    (bar,) = [o["data"][WIDGET_VIEW] for o in training.outputs if WIDGET_VIEW in o.get("data", {})]
    # the bar as the kernel left it: run to the end, with the loss and the steps/s
    widgets = notebook.metadata["widgets"][WIDGET_STATE]["state"]
    parts = [widgets[child.removeprefix("IPY_MODEL_")] for child in
             widgets[bar["model_id"]]["state"]["children"]]  # fmt: skip
    (progress,) = [p["state"] for p in parts if p["model_name"] == "FloatProgressModel"]
    assert progress["value"] == progress["max"] == iters
    status = " ".join(p["state"]["value"] for p in parts if p["model_name"] == "HTMLModel")
    assert f"{iters}/{iters}" in status
    assert "step/s" in status and "loss=" in status
    trained = output_text(training.outputs)
    assert re.search(rf"^step +{iters} +epoch ", trained, re.MULTILINE), trained

    summary = output_text(cell_with(notebook, '"outputs in"').outputs)
    for key in ("final_loss", "train_acc", "test_acc"):  # 4 significant digits, 0.09580 too
        assert re.search(rf"^ +{key}: (0\.0*[1-9]|[1-9]\.)\d{{3}}$", summary, re.MULTILINE), summary
    assert f"outputs in {out}\n" in summary
    assert json.loads((out / "summary.json").read_text())["iters"] == iters

    figures = cell_with(notebook, "plot_run(")
    # once, as the cell's value, not a second time by pyplot at the end of the cell
    assert sum("image/png" in o.get("data", {}) for o in figures.outputs) == 1

    for cell, text in zip(code_cells(notebook), printed, strict=True):
        assert ray_log_lines(text) == [], cell.source
    return trained


def is_a_new_temporary_folder(path: Path) -> bool:
    """Whether path is one the notebook made with tempfile.mkdtemp(prefix="distnum-ch4-")."""
    return path.parent == Path(tempfile.gettempdir()) and path.name.startswith("distnum-ch4-")


def test_the_notebook_runs_top_to_bottom(mnist_dir, tmp_path, monkeypatch):
    """As a user runs it: its own Ray, started and shut down, and its run in a new folder in the
    system's temporary folder, not beside the notebook."""
    monkeypatch.setenv("DISTNUM_NOTEBOOK_ITERS", str(NOTEBOOK_ITERS))
    monkeypatch.setenv("DISTNUM_DATA", str(mnist_dir))
    monkeypatch.delenv("DISTNUM_NOTEBOOK_OUT", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    try:
        execute(notebook, cwd=tmp_path)
        out = printed_run_folder(notebook)
        assert out is not None and is_a_new_temporary_folder(out), out
        check_the_run(notebook, NOTEBOOK_ITERS, out)
    finally:
        out = printed_run_folder(notebook)
        if out is not None and is_a_new_temporary_folder(out):
            shutil.rmtree(out, ignore_errors=True)
    assert list(tmp_path.iterdir()) == []  # nothing written where the kernel ran


def test_the_japanese_notebook_is_the_english_one_with_its_text_in_japanese():
    english, japanese = (nbformat.read(path, as_version=4) for path in (NOTEBOOK, NOTEBOOK_JA))
    assert [c.cell_type for c in japanese.cells] == [c.cell_type for c in english.cells]
    assert [c.source for c in code_cells(japanese)] == [c.source for c in code_cells(english)]
    assert all(c.outputs == [] and c.execution_count is None for c in code_cells(japanese))
    for cell in japanese.cells:
        if cell.cell_type == "markdown":
            assert re.search("[\u3040-\u30ff]", cell.source), cell.source  # kana
    assert japanese.metadata == english.metadata


def test_the_japanese_notebook_runs_top_to_bottom_on_a_running_ray(
    mnist_dir, ray_session, tmp_path, monkeypatch
):
    """In a kernel that joins the tests' Ray, as one joins a cluster through RAY_ADDRESS (no Ray
    of its own to start and stop: seconds saved), with a few steps, and its run in the folder
    DISTNUM_NOTEBOOK_OUT names."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError:  # a Ray without token authentication
        token_auth = False
    else:
        token_auth = get_authentication_mode() == AuthenticationMode.TOKEN
    monkeypatch.setenv("RAY_ADDRESS", ray_session.get_runtime_context().gcs_address)
    if token_auth:
        # given an address, ray.init() sends the token (~/.ray/auth_token) only with
        # RAY_AUTH_MODE=token; without it, it fails to connect after 20 s
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("DISTNUM_NOTEBOOK_ITERS", str(NOTEBOOK_JA_ITERS))
    monkeypatch.setenv("DISTNUM_DATA", str(mnist_dir))
    out = tmp_path / "run"
    monkeypatch.setenv("DISTNUM_NOTEBOOK_OUT", str(out))
    notebook = nbformat.read(NOTEBOOK_JA, as_version=4)
    execute(notebook, cwd=tmp_path)
    assert printed_run_folder(notebook) == out
    trained = check_the_run(notebook, NOTEBOOK_JA_ITERS, out)
    assert list(tmp_path.iterdir()) == [out]

    # its workers ran on the tests' Ray, which its ray.shutdown() left running, with the CPUs
    # of the run's actors given back for the tests that follow
    assert ray_session.get_runtime_context().get_node_id() in trained, trained
    deadline = time.monotonic() + 30
    while ray_session.available_resources().get("CPU") != ray_session.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray_session.available_resources()
        time.sleep(0.1)


class Kernel:
    """A real IPython kernel, as Jupyter runs one, and what its cells output."""

    def __init__(self, cwd: Path) -> None:
        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(cwd))
        self.seen: list[dict] = []  # every output of every cell

    def start(self, code: str) -> str:
        return self.client.execute(code)

    def outputs(self, msg_id: str, timeout: float = 300) -> list[dict]:
        """The outputs of the cell started as msg_id, once it has finished."""
        outputs, deadline = [], time.monotonic() + timeout
        while True:
            message = self.client.get_iopub_msg(timeout=max(deadline - time.monotonic(), 1))
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "status" and content["execution_state"] == "idle":
                self.seen.extend(outputs)
                return outputs
            if kind in ("stream", "display_data", "execute_result", "error"):
                outputs.append({"output_type": kind, **content})

    def run(self, code: str) -> list[dict]:
        return self.outputs(self.start(code))

    def run_ok(self, code: str) -> list[dict]:
        """The outputs of a cell that must not fail."""
        outputs = self.run(code)
        assert not [o for o in outputs if o["output_type"] == "error"], output_text(outputs)
        return outputs

    def value(self, code: str) -> str:
        """The text of the value of a cell that must not fail."""
        outputs = self.run_ok(code)
        (value,) = [o for o in outputs if o["output_type"] == "execute_result"]
        return value["data"]["text/plain"]

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture
def kernel(tmp_path):
    kernel = Kernel(tmp_path)
    yield kernel
    kernel.close()


def test_a_session_on_the_users_ray_runs_fails_stops_and_goes_on(kernel, tiny_mnist, tmp_path):
    train = f"distnum.train(batch_size=10, data_dir={str(tiny_mnist)!r}"
    kernel.run_ok("import ray, distnum\nray.init(num_cpus=2)")

    first = kernel.run_ok(f"first = {train}, iters=12, out='first')")
    assert [o for o in first if WIDGET_VIEW in o.get("data", {})] != []
    assert "step     12  epoch" in output_text(first)
    # workers default to the CPUs of the user's Ray, which is left running
    assert kernel.value("first['workers'], ray.is_initialized()") == "(2, True)"

    # a run that fails shows its one error, and no lines of Ray's
    kernel.run_ok(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport failing_engine\n"
                  "ray.cloudpickle.register_pickle_by_value(failing_engine)")  # fmt: skip
    failed = kernel.run(f"{train}, iters=12, engine=failing_engine.FailingEngine, out='fails')")
    (error,) = [o for o in failed if o["output_type"] == "error"]
    assert error["ename"] == "WorkerFailed"
    assert error["evalue"].startswith("a worker actor raised RuntimeError: injected failure "
                                      "in the engine; last checkpoint: none yet, in fails; go "
                                      "on with train(out='fails', resume=True)")  # fmt: skip

    # Jupyter's "interrupt the kernel": SIGINT to the kernel's process
    interrupted = kernel.start(f"{train}, iters=10**6, checkpoint_every=6, out='stopped')")
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("test_acc") >= 2):
        assert time.monotonic() < deadline, output_text(kernel.outputs(interrupted, 1))
        time.sleep(0.2)
    kernel.manager.interrupt_kernel()
    signalled = time.monotonic()
    (error,) = [o for o in kernel.outputs(interrupted) if o["output_type"] == "error"]
    assert time.monotonic() - signalled < 30
    assert error["ename"] == "Interrupted", error
    stopped_at = int(re.search(r"stopped by SIGINT at step (\d+) ", error["evalue"])[1])
    # a checkpoint at that step, not only the last one of every 6
    manifests = (tmp_path / "stopped" / "checkpoints").glob("step-*.json")
    assert max(int(re.fullmatch(r"step-(\d+)", path.stem)[1]) for path in manifests) == stopped_at

    # the kernel goes on: the same Ray, and the interrupted run resumed to its end
    resumed = f"{train}, iters={stopped_at + 6}, out='stopped', resume=True)"
    assert kernel.value(f"resumed = {resumed}\nresumed['iters'], ray.is_initialized()") == (
        f"({stopped_at + 6}, True)"
    )
    kernel.run_ok("ray.shutdown()")
    assert ray_log_lines(output_text(kernel.seen)) == []
