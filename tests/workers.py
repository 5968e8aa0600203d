"""Real `tfpipe worker` processes for the tests: `tfpipe.processes`, re-exported.

Shared by tests/test_cluster.py, tests/test_cluster_recovery.py and the benchmark smoke tests.
A `WorkerPool` starts `python -m tfpipe worker` processes on free loopback ports, waits
(bounded) until each prints its ready line, can start a task again on its old port after it
died, and ends every process it started (SIGCONT, SIGTERM, then SIGKILL), also at interpreter
exit. `ENV` is the environment the tests give the processes they start themselves.
"""

from __future__ import annotations

import os

from tfpipe.processes import ROOT, Worker, WorkerPool, end, free_port, gone

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}

__all__ = ["ENV", "ROOT", "Worker", "WorkerPool", "end", "free_port", "gone"]
