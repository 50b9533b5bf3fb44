"""Options named as the user wrote them: `--batch-size 100` on the command line,
`batch_size=100` from Python, so that every message names what the user can change."""

from __future__ import annotations

import contextvars

command_line = contextvars.ContextVar("command_line", default=False)  # the CLI sets it


def option(name: str, value: object = ...) -> str:
    """name (a Python argument name), with value when one is given, as the user wrote it."""
    if command_line.get():
        flag = "--" + name.replace("_", "-")
        if value is ...:
            return flag
        if isinstance(value, (list, tuple)):  # an option of several values: --hidden 100 100
            return " ".join([flag, *map(str, value)])
        quoted = isinstance(value, str) and (" " in value or not value)
        return f"{flag} {value!r}" if quoted else f"{flag} {value}"
    return f"{name}=" if value is ... else f"{name}={value!r}"


def resume_hint(out: object) -> str:
    """How to go on with the run in out: `--resume OUT`, or from Python
    `train(out='OUT', resume=True)`."""
    if command_line.get():
        return option("resume", str(out))
    return f"train(out={str(out)!r}, resume=True)"
