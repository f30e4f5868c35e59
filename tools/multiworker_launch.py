"""Runs a command as N TensorFlow workers on this machine (TF_CONFIG set).

For trying `MultiWorkerMirroredStrategy` (``--config.strategy.name=
multi_worker``) without a cluster: every worker is a local process with
its own free port on 127.0.0.1 and the ``TF_CONFIG`` naming the whole
cluster and its own index; worker 0 is the chief. Each worker's output goes
to ``worker<i>.log`` in ``--log_dir``; the exit code is the first non-zero
worker exit code (0 if all succeeded).

Example::

    python tools/multiworker_launch.py --workers=2 --log_dir=/tmp/mw -- \\
        python -m e2rnas_tf search --config=configs/search_demo.py \\
        --config.strategy.name=multi_worker --workdir=runs/mw

Reference:
    https://www.tensorflow.org/tutorials/distribute/multi_worker_with_ctl
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def free_ports(count):
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def tf_configs(count):
    """One ``TF_CONFIG`` JSON string per worker of a local cluster."""
    if int(count) < 1:
        raise ValueError(f"Expected workers >= 1. Received: workers={count}")
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(count)]}
    return [json.dumps({"cluster": cluster,
                        "task": {"type": "worker", "index": i}})
            for i in range(count)]


def launch(command, workers, log_dir, env=None, timeout=None):
    """Runs ``command`` as ``workers`` local workers and waits for them.

    Args:
        command: argv list, the same for every worker.
        workers: number of workers.
        log_dir: directory for ``worker<i>.log`` (stdout and stderr).
        env: base environment (default: this process's).
        timeout: seconds before every worker is killed (None: no limit).

    Returns:
        The list of exit codes (None for a worker killed at the timeout).
    """
    os.makedirs(log_dir, exist_ok=True)
    procs, logs = [], []
    for i, tf_config in enumerate(tf_configs(workers)):
        worker_env = dict(os.environ if env is None else env,
                          TF_CONFIG=tf_config)
        log = open(os.path.join(log_dir, f"worker{i}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen(command, env=worker_env, stdout=log,
                                      stderr=subprocess.STDOUT))
    deadline = None if timeout is None else time.monotonic() + timeout
    codes = []
    try:
        for proc in procs:
            left = (None if deadline is None
                    else max(deadline - time.monotonic(), 0.0))
            try:
                codes.append(proc.wait(timeout=left))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    return codes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--log_dir", default="multiworker_logs")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("expected a command after --")
    codes = launch(command, args.workers, args.log_dir,
                   timeout=args.timeout)
    for i, code in enumerate(codes):
        print(f"worker {i}: exit {code} "
              f"({os.path.join(args.log_dir, f'worker{i}.log')})")
    bad = [c for c in codes if c != 0]
    return (bad[0] if bad[0] is not None else 1) if bad else 0


if __name__ == "__main__":
    sys.exit(main())
