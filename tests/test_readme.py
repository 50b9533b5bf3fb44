"""The README's code, run as written.

Every ```python block runs in a fresh interpreter (this one's), in a folder of its own, with
DISTNUM_DATA passed through; every ```bash block runs in bash, with this interpreter's
scripts (the `distnum` command) first on PATH. A block that takes long or changes the
machine (installs, the 10,000-step run, a cluster) is marked in the README, just above it,
with `<!-- not run by tests/test_readme.py: REASON -->`, and skipped with that reason; the
quick start's block is one of them, and its lines are checked instead, as CI runs them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MAX_LINES = 300
SKIP_MARK = re.compile(r"<!-- not run by tests/test_readme\.py: (?P<reason>.+) -->")
FENCE = re.compile(r"```(?P<lang>\w*)")
QUICK_START = [  # CI extracts these lines from the README and runs them
    "python3 -m venv ~/.venvs/distnum && . ~/.venvs/distnum/bin/activate",
    "pip install . && distnum train",
    'pip install ".[test]" && python -m pytest',
]
# commands that must never run here: a block holding one must be marked
LONG_COMMANDS = re.compile(
    r"pip install|python3? -m venv|jupyter|ray job|local_cluster\.py|examples/"
    r"|distnum train(?! --help)|distnum bench|ray start|ray up|kubectl"
)
TIMEOUT_S = 180


@dataclass
class Block:
    lang: str
    text: str
    line: int  # of the opening fence, counted from 1
    heading: str  # the section it is in
    skip: str | None  # the reason it is not run, from its mark

    @property
    def id(self) -> str:
        return f"{self.lang}-line{self.line}"


def read_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, with their marks."""
    blocks, lines = [], text.splitlines()
    heading, mark, number = "", None, 0
    while number < len(lines):
        line = lines[number]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if SKIP_MARK.fullmatch(line.strip()):
            mark = SKIP_MARK.fullmatch(line.strip())["reason"]
        elif fence := FENCE.fullmatch(line.strip()):
            end = next(i for i in range(number + 1, len(lines)) if lines[i].strip() == "```")
            body = "\n".join(lines[number + 1 : end]) + "\n"
            blocks.append(Block(fence["lang"], body, number + 1, heading, mark))
            mark, number = None, end
        elif line.strip():
            mark = None  # a mark belongs to the block right below it
        number += 1
    return blocks


BLOCKS = read_blocks(README.read_text())


def command(line: str) -> str:
    """A shell line without its trailing comment."""
    return re.sub(r"\s+#.*$", "", line).strip()


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_quick_start_block_is_what_ci_runs():
    quick = [b for b in BLOCKS if b.heading == "Quick start" and b.lang == "bash"]
    assert len(quick) == 1, "one bash block under '## Quick start'"
    lines = [line for line in quick[0].text.splitlines() if line.strip()]
    assert [command(line) for line in lines] == QUICK_START
    assert command(lines[2]) == 'pip install ".[test]" && python -m pytest'
    # CI takes the README's first line that starts so: it must be the quick start's
    first = next(n for n, line in enumerate(README.read_text().splitlines(), 1)
                 if line.startswith('pip install ".[test]" && python -m pytest'))  # fmt: skip
    assert quick[0].line < first <= quick[0].line + len(quick[0].text.splitlines())


def test_long_blocks_are_marked():
    unmarked = [b.id for b in BLOCKS if b.skip is None and LONG_COMMANDS.search(b.text)]
    assert not unmarked, f"blocks too long to run here, not marked as such: {unmarked}"
    text = README.read_text().splitlines()
    marks = [n for n, line in enumerate(text, 1) if "not run by tests/test_readme.py" in line]
    assert len(marks) == sum(b.skip is not None for b in BLOCKS), "a mark above no block"


def block_env(mnist_dir: Path, ray_address: str) -> dict[str, str]:
    """The environment a reader's shell would have, the data found through DISTNUM_DATA, and
    the tests' Ray named by RAY_ADDRESS (a reader's ray.init() would start one, in seconds)."""
    env = {**os.environ, "DISTNUM_DATA": str(mnist_dir), "RAY_ADDRESS": ray_address}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def check_ran(block: Block, done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, (
        f"README.md line {block.line} ({block.lang}) ended with status {done.returncode}\n"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    )


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "python"], ids=lambda b: b.id)
def test_python_block(block: Block, mnist_dir: Path, ray_session, tmp_path: Path):
    assert block.skip is None, "every python block of the README runs"
    script = tmp_path / f"readme_line{block.line}.py"
    script.write_text(block.text)
    env = block_env(mnist_dir, ray_session.get_runtime_context().gcs_address)
    done = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    check_ran(block, done)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash"], ids=lambda b: b.id)
def test_bash_block(block: Block, request: pytest.FixtureRequest, tmp_path: Path):
    if block.skip is not None:
        pytest.skip(f"README.md line {block.line}: {block.skip}")
    mnist_dir = request.getfixturevalue("mnist_dir")  # a skip, or a failure, without it
    ray_address = request.getfixturevalue("ray_session").get_runtime_context().gcs_address
    env = block_env(mnist_dir, ray_address)
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip
    check_ran(block, done)


def test_every_block_is_python_or_bash():
    assert {b.lang for b in BLOCKS} <= {"python", "bash", "text"}, "a block of another kind"
