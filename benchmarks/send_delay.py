"""A minimal TensorFlow-only reproduction: a one-thread worker sends a tensor only once it idles.

Upstream-ready (imports only TensorFlow; no tfpipe). Two `tf.distribute.Server` workers on
loopback, and a client connected with `tf.config.experimental_connect_to_cluster` whose
inter-op pool size (which the workers' pools for its functions follow) is `--inter-op N`.
One function: worker 0 computes `a` (one 256 x 1024 by 1024 x 1024 product), then, after
`a`, a chain `b` of 40 such products; worker 1 reads `a`. Printed per run: how long after
`b` started worker 1 had `a`, and how long `b` took.

With one inter-op thread, worker 1 gets `a` only after `b` ended: TensorFlow's executor
counts `_Send` on a CPU device as an expensive op (`OpKernel::expensive_` is true off GPU),
so when it and `b`'s first product become ready together, `ExecutorState::ScheduleReady`
queues the send on the inter-op pool and runs the product inline; the chain continues
inline, and the queued send waits until the thread has nothing else (the pool's own-thread
queue is last-in first-out). With two threads, the second sends at once. The node log
(`TF_CPP_VMODULE=executor=1` on the workers) shows `a`'s `_Send` processed after `b`'s last
`MatMul`. (The executor's cost estimate, which would later mark the send cheap, did not
change this over 200 runs.)

Usage:
    python -m benchmarks.send_delay [--inter-op 1,2] [--runs 4]
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import time

SERVER = """
import sys, time, tensorflow as tf
spec = tf.train.ClusterSpec({"worker": sys.argv[1].split(",")})
server = tf.distribute.Server(spec, job_name="worker", task_index=int(sys.argv[2]))
print("ready", flush=True)
time.sleep(3600)
"""

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def handover(d0: str, d1: str, runs: int) -> list[tuple[float, float, float]]:
    """On device `d0`: `a`, then (after it) the chain `b`; on `d1`, a read of `a`. Returns, per
    run after one warm-up, the times (s, one clock) `b` started, `d1` had `a`, `b` ended.

    Built with `wrap_function`, whose graph has no automatic control dependencies: in a
    `tf.function` the `tf.timestamp`s (stateful ops) would run in program order.
    """
    import tensorflow as tf

    with tf.device(d0):
        x = tf.Variable(tf.random.normal((256, 1024)))
        w = tf.Variable(tf.random.normal((1024, 1024)) * 0.03)

    def step() -> tuple[tf.Tensor, ...]:
        with tf.device(d0):
            a = tf.matmul(x, w)
            with tf.control_dependencies([a]):
                b = x.read_value()
                b_start = tf.timestamp()
            for _ in range(40):
                b = tf.matmul(b, w)
            b_sum = tf.reduce_sum(b[:1, :1])  # an output, so that Grappler keeps the chain
            with tf.control_dependencies([b_sum]):
                b_end = tf.timestamp()
        with tf.device(d1):
            a_sum = tf.reduce_sum(a[:1, :1])
            with tf.control_dependencies([a_sum]):
                a_here = tf.timestamp()
        return b_start, a_here, b_end, a_sum, b_sum

    fn = tf.compat.v1.wrap_function(step, [])
    fn()
    out = []
    for _ in range(runs):
        b_start, a_here, b_end = (float(t) for t in fn()[:3])
        out.append((b_start, a_here, b_end))
    return out


def client(addresses: str, inter_op: int, runs: int) -> None:
    """The client process: connects with `inter_op` threads and prints one line per run."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    tf.config.experimental_connect_to_cluster(
        tf.train.ClusterSpec({"worker": addresses.split(",")}))
    d0, d1 = "/job:worker/task:0/device:CPU:0", "/job:worker/task:1/device:CPU:0"
    for b_start, a_here, b_end in handover(d0, d1, runs):
        print(f"inter-op {inter_op}: worker 1 had a {1e3 * (a_here - b_start):6.1f} ms after b "
              f"started; b took {1e3 * (b_end - b_start):6.1f} ms: "
              f"{'sent while computing' if a_here < b_end else 'sent once idle'}", flush=True)


def _wait_ready(server: subprocess.Popen[str], deadline: float) -> None:
    """Waits until `server` printed its "ready" line, at most until `deadline`."""
    assert server.stdout is not None
    readable, _, _ = select.select([server.stdout], [], [], max(0.0, deadline - time.monotonic()))
    if not readable or server.stdout.readline() != "ready\n":
        raise RuntimeError("a tf.distribute.Server did not start within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inter-op", default="1,2", help="client inter-op threads to try")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args.client, int(args.inter_op), args.runs)
        return
    for inter_op in map(int, args.inter_op.split(",")):
        addresses = f"localhost:{_port()},localhost:{_port()}"
        servers = [subprocess.Popen([sys.executable, "-c", SERVER, addresses, str(task)],
                                    stdout=subprocess.PIPE, text=True, env=ENV)
                   for task in (0, 1)]
        try:
            deadline = time.monotonic() + 120
            for server in servers:  # each prints "ready" once it serves; a bounded wait
                _wait_ready(server, deadline)
            subprocess.run([sys.executable, "-m", "benchmarks.send_delay", "--client",
                            addresses, "--inter-op", str(inter_op), "--runs", str(args.runs)],
                           check=True, env=ENV, timeout=300)
        finally:
            for server in servers:
                server.kill()
                server.wait(timeout=30)


if __name__ == "__main__":
    main()
