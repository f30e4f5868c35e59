"""Start-up and step time of a supernet fwd+bwd: SearchCell vs FusedSearchCell.

Builds `search_space.SearchNetwork` with either cell implementation and
times one ``tf.function(autograph=False)`` computing the cross-entropy and
its gradient w.r.t. every trainable variable (weights and alphas), with
grappler's meta optimizer disabled as `runtime.configure` does:

* trace: ``get_concrete_function`` (Python tracing, forward and backward);
* first: the first call after tracing (graph instantiation + one step);
* step: median of the following steps;
* ops: nodes of the traced graph.

Each (implementation, size, repeat) runs in a fresh subprocess so that no
run benefits from another's caches. The CPU is shared with other jobs:
repeat runs (``--repeats``) and read medians.

Usage::

    python tools/trace_bench.py --repeats 3
    python tools/trace_bench.py --impl reference --impl batched \\
        --impl split --layers 8 --channels 16 --batch 64 --size 32
    python tools/trace_bench.py --impl fused --layers 5 --channels 8 \\
        --batch 32 --size 16 --steps 10 --single
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

SIZES = ((5, 8, 32, 16), (8, 16, 64, 32))  # layers, channels, batch, size
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


IMPLS = ("reference", "fused", "batched", "split")


def _network(impl, layers, channels):
    import functools
    from unittest import mock

    from e2rnas_tf.space import fused_cell, search_space
    kwargs = dict(channels=channels, num_classes=10, layers=layers,
                  alpha_seed=0)
    if impl != "reference":
        # SearchNetwork looks SearchCell up at construction time.
        layout = "batched" if impl == "fused" else impl
        patch = mock.patch.object(
            search_space, "SearchCell",
            functools.partial(fused_cell.FusedSearchCell, edge_layout=layout))
    else:
        patch = contextlib.nullcontext()
    with patch:
        return search_space.SearchNetwork(**kwargs)


def run_single(args):
    """Times one configuration in this process; prints a JSON line."""
    import numpy as np
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": True})
    tf.random.set_seed(0)
    net = _network(args.impl, args.layers, args.channels)
    shape = [args.batch, args.size, args.size, 3]
    net.build(shape)
    images = tf.random.uniform(shape, seed=1)
    labels = tf.random.uniform([args.batch], 0, 10, tf.int32, seed=2)
    variables = net.trainable_variables

    def step(x, y):
        with tf.GradientTape() as tape:
            logits = net(x, training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
        return loss, tape.gradient(loss, variables)

    fn = tf.function(step, autograph=False)
    start = time.perf_counter()
    concrete = fn.get_concrete_function(images, labels)
    trace = time.perf_counter() - start
    num_ops = len(concrete.graph.get_operations())
    start = time.perf_counter()
    loss, grads = fn(images, labels)
    float(loss)
    first = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss, grads = fn(images, labels)
        float(loss)
        times.append(time.perf_counter() - start)
    print(json.dumps(dict(
        impl=args.impl, layers=args.layers, channels=args.channels,
        batch=args.batch, size=args.size, trace_s=trace, first_s=first,
        step_ms=1e3 * float(np.median(times)), graph_ops=num_ops,
        params=int(sum(np.prod(v.shape) for v in variables)))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=IMPLS, action="append",
                        help="implementations to time (repeatable); "
                        "fused = FusedSearchCell (default batched edge "
                        "layout), batched/split = that edge layout; "
                        "default: reference and fused")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--channels", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps after the first (>= 10 advised)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single", action="store_true",
                        help="run one configuration in this process")
    args = parser.parse_args(argv)
    if args.single:
        args.impl = args.impl[-1] if args.impl else "fused"
        run_single(args)
        return 0
    sizes = SIZES
    if args.layers:
        sizes = ((args.layers, args.channels, args.batch, args.size),)
    impls = tuple(args.impl) if args.impl else ("reference", "fused")
    results = {}
    for layers, channels, batch, size in sizes:
        for repeat in range(args.repeats):
            # Alternate the order so that slow phases of a shared CPU hit
            # both implementations alike.
            order = impls if repeat % 2 == 0 else impls[::-1]
            for impl in order:
                cmd = [sys.executable, __file__, "--single", "--impl", impl,
                       "--layers", str(layers), "--channels", str(channels),
                       "--batch", str(batch), "--size", str(size),
                       "--steps", str(args.steps)]
                env = dict(os.environ)
                env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (REPO, env.get("PYTHONPATH")) if p)
                out = subprocess.run(cmd, check=True, capture_output=True,
                                     text=True, env=env)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                results.setdefault((layers, channels, batch, size, impl),
                                   []).append(row)
    print("\nmedians (min-max) over repeats:")
    for key, rows in results.items():
        parts = []
        for field in ("trace_s", "first_s", "step_ms"):
            vals = [r[field] for r in rows]
            parts.append(f"{field}={statistics.median(vals):.3f} "
                         f"({min(vals):.3f}-{max(vals):.3f})")
        print(f"layers={key[0]} C={key[1]} batch={key[2]} {key[3]}x{key[3]} "
              f"{key[4]:9s} ops={rows[0]['graph_ops']} " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
