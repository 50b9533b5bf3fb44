"""Ray's own log lines, kept out of a run that goes well.

Through its `ray` logger Ray writes to the driver's stderr: an INFO line when it starts or
joins a cluster, a WARNING on every local start saying that token authentication is on (since
Ray 2.59 a notice, not a fault), a WARNING when /dev/shm is too small for its object store
(distnum's steps do not use it), and INFO lines (one per actor among them) each time a
compiled graph is torn down. In a notebook they land in the cell's output; on the command
line they come before the run's own lines. `ray.init()` sets the level of the `ray` logger
itself (INFO unless told otherwise), so distnum raises the levels of the three module
loggers that write those lines instead, and filters the /dev/shm warning out of a fourth:
no `ray.init` resets them. It does so when distnum is imported, so that it holds for a
`ray.init()` the user calls as well as for the one distnum calls.

A real fault still shows: Ray raises it as an exception (which distnum reports in one line),
and these loggers still pass their ERROR lines, the graph's and the worker's their WARNINGs.
DISTNUM_RAY_LOGS=1 leaves them all as Ray sets them, to see what Ray does.
"""

from __future__ import annotations

import logging
import os

# logger name -> the least level it passes
QUIET_LEVELS = {
    # "Token authentication is enabled for this Ray cluster ..." on every local ray.init()
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # "Started a local Ray instance.", "Connecting to existing Ray cluster at address: ..."
    "ray._private.worker": logging.WARNING,
    # "Tearing down compiled DAG", "Cancelling compiled worker on actor: ...", "Waiting for
    # worker tasks to exit", "Teardown complete" at the end of every run
    "ray.dag.compiled_dag_node": logging.WARNING,
}


class ObjectStoreOnDisk(logging.Filter):
    """Drops Ray's warning that its object store is on disk because /dev/shm is small
    ("This will harm performance!"): a run's steps go through distnum's own shared memory
    (distnum/node_channel.py), and the object store carries the data set once, at start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("WARNING: The object store is using")


def quiet_ray_logs() -> None:
    """Raise the level of Ray's chatty loggers (QUIET_LEVELS), except those the caller has
    given a level of their own: `logging.getLogger(name).setLevel(logging.INFO)` brings one
    back; DISTNUM_RAY_LOGS=1 leaves them all. Needs no import of Ray: a logger's level set
    before its module exists is kept."""
    if os.environ.get("DISTNUM_RAY_LOGS") == "1":
        return
    for name, level in QUIET_LEVELS.items():
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
    services = logging.getLogger("ray._private.services")  # on a local start
    if not any(isinstance(f, ObjectStoreOnDisk) for f in services.filters):
        services.addFilter(ObjectStoreOnDisk())
