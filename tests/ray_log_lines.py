"""What a line of Ray's own logging looks like, so that a test can say none reached a user."""

from __future__ import annotations

import re

RAY_LOG_LINE = re.compile(
    "|".join(
        [
            # Ray's Python loggers: "2026-11-29 09:31:51,485\tINFO compiled_dag_node.py:2173 -- "
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(DEBUG|INFO|WARNING|ERROR|CRITICAL) "
            r"\S+\.py:\d+ -- ",
            # its C++ core: "[2026-11-29 09:31:51,485 I 1234 1234] core_worker.cc:..."
            r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\]",
            # workers' output sent to the driver: "(GradientWorker pid=1234) ...", "(raylet) ..."
            r"^\((raylet|\w+ pid=\d+|pid=\d+)[^)]*\) ",
            # what it says, whatever the format
            r"Token authentication is (enabled|disabled)",
            r"Started a local Ray instance|Connecting to existing Ray cluster",
            r"Tearing down compiled DAG|Cancelling compiled worker|Waiting for worker tasks",
            r"Teardown complete",
        ]
    ),
    re.MULTILINE,
)


def ray_log_lines(text: str) -> list[str]:
    """The lines of text that Ray wrote."""
    return [line for line in text.splitlines() if RAY_LOG_LINE.search(line)]
