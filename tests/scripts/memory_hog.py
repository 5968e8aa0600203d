"""A stand-in for `tfpipe worker` in tests/test_sentinel.py: the real sentinel beside a process
that needs no TensorFlow.

`python memory_hog.py PORT TTL_S` starts the out-of-memory sentinel (`tfpipe.sentinel.start`,
as `tfpipe worker` does) for port PORT, prints `ready <sentinel pid>`, and then reads stdin:
on a line `hog` it allocates (and touches) 16 MiB blocks until the kernel kills it; on end of
input it exits 0. It loads `tfpipe.sentinel` the way the sentinel itself does, without the
package's `__init__` (which imports TensorFlow), so it starts in a fraction of a second.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

package = types.ModuleType("tfpipe")
package.__path__ = [str(Path(__file__).resolve().parents[2] / "tfpipe")]
sys.modules["tfpipe"] = package

from tfpipe import sentinel  # noqa: E402


def main(argv: list[str]) -> int:
    port, ttl_s = int(argv[0]), float(argv[1])
    guard = sentinel.start(port, f"localhost:{port}", 0, ttl_s)
    print(f"ready {guard.pid}", flush=True)
    for line in sys.stdin:
        if line.strip() == "hog":
            blocks = []
            while True:
                blocks.append(bytearray(16 << 20))  # zero-filled: every page is touched
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
