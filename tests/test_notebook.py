"""distnum in Jupyter, in a real IPython kernel: the example notebook top to bottom, and a
session in which the user started Ray (that Ray used and kept, a second run, an interrupt)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient
from ray_log_lines import ray_log_lines

TESTS = Path(__file__).resolve().parent
NOTEBOOK = TESTS.parent / "examples" / "ch4_numerical_gradient.ipynb"
NOTEBOOK_ITERS = 200  # the notebook's DISTNUM_NOTEBOOK_ITERS here: a few seconds of training
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def output_text(outputs: list[dict]) -> str:
    """Everything a cell's outputs show as text: streams, plain-text values, errors."""
    parts = []
    for output in outputs:
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
        parts.extend([output.get("ename", ""), output.get("evalue", "")])
        parts.extend(output.get("traceback", []))
    return "\n".join(parts)


def cell_with(notebook: nbformat.NotebookNode, code: str) -> nbformat.NotebookNode:
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and code in c.source]
    return cell


def test_the_notebook_runs_top_to_bottom(mnist_dir, tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)

    monkeypatch.setenv("DISTNUM_NOTEBOOK_ITERS", str(NOTEBOOK_ITERS))
    monkeypatch.setenv("DISTNUM_DATA", str(mnist_dir))
    started = time.monotonic()
    # a cell that raises fails the test here (CellExecutionError)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    print(f"notebook: {time.monotonic() - started:.1f} s")

    training = cell_with(notebook, "distnum.train(")
    (bar,) = [o["data"][WIDGET_VIEW] for o in training.outputs if WIDGET_VIEW in o.get("data", {})]
    # the bar as the kernel left it: run to the end, with the loss and the steps/s
    widgets = notebook.metadata["widgets"][WIDGET_STATE]["state"]
    parts = [widgets[child.removeprefix("IPY_MODEL_")] for child in
             widgets[bar["model_id"]]["state"]["children"]]  # fmt: skip
    (progress,) = [p["state"] for p in parts if p["model_name"] == "FloatProgressModel"]
    assert progress["value"] == progress["max"] == NOTEBOOK_ITERS
    status = " ".join(p["state"]["value"] for p in parts if p["model_name"] == "HTMLModel")
    assert f"{NOTEBOOK_ITERS}/{NOTEBOOK_ITERS}" in status
    assert "step/s" in status and "loss=" in status
    assert f"step    {NOTEBOOK_ITERS}  epoch" in output_text(training.outputs)

    figures = cell_with(notebook, "plot_run(")
    assert [o for o in figures.outputs if "image/png" in o.get("data", {})] != []
    # once, as the cell's value, not a second time by pyplot at the end of the cell
    assert sum("image/png" in o.get("data", {}) for o in figures.outputs) == 1

    for cell in code_cells:
        assert ray_log_lines(output_text(cell.outputs)) == [], cell.source
    (run,) = (tmp_path / "runs").iterdir()
    assert '"iters": 200' in (run / "summary.json").read_text()


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
    assert error["evalue"] == "a worker actor raised RuntimeError: injected failure in the engine"

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
