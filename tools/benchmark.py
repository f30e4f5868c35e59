"""Times the E2RNAS search step (not a test; the figures go to BENCHMARKS.md).

Configurations (synthetic 10-class data, so no data set is needed):

- A: 8 cells, C=16, batch 64, 32x32, first order, objectives acc + adv
  (FGSM) + params (abs), l2-normalised MGDA: the paper's search step.
- B: as A, second order (DARTS unrolled).
- C: 5 cells, C=8, batch 32, 16x16, first order (the CPU demo's scale).

Reports the time to the first step (trace + graph instantiation + the
step), the median seconds per step over ``--steps`` steps after
``--warmup``, images per second (batch / s per step, the authors'
definition), peak resident memory, and with ``--profile`` the time of the
step's parts (forward, each backward, the attack) as separate compiled
functions.

    python tools/benchmark.py --config C --steps 10 --threads 2 --profile
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_config(name):
    from e2rnas_tf import config_lib

    c = config_lib.search_config()
    c.objectives = ["acc", "adv", "params"]
    c.attack.name = "fgsm"
    c.resource.params_constraint = "abs"
    c.resource.params_target = 2.0
    c.combine.method = "mgda"
    c.combine.normalization = "l2"
    if name in ("A", "B"):
        c.model.layers, c.model.channels, c.batch_size, size = 8, 16, 64, 32
        c.arch.order = "first" if name == "A" else "second"
    elif name == "C":
        c.model.layers, c.model.channels, c.batch_size, size = 5, 8, 32, 16
        c.arch.order = "first"
    else:
        raise ValueError(f"Expected --config in A, B, C. Received: {name!r}")
    c.lock()
    return c, size


def peak_rss_gib():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="C", choices=["A", "B", "C"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads (0 = TF default)")
    parser.add_argument("--profile", action="store_true",
                        help="also time forward / backward / attack alone")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    from e2rnas_tf import objectives as obj_lib
    from e2rnas_tf import runtime
    from e2rnas_tf import search_step as step_lib
    from e2rnas_tf.search_space import SearchNetwork, count_params

    config, size = make_config(args.config)
    runtime.configure(config)
    m = config.model
    net = SearchNetwork(channels=m.channels, num_classes=10, layers=m.layers,
                        alpha_seed=0)
    net.build((None, size, size, 3))
    t0 = time.perf_counter()
    step = step_lib.SearchStep(net, config, num_classes=10, image_size=size,
                               steps_per_epoch=1000)
    table_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    b = config.batch_size

    def data():
        return (tf.constant(rng.random((b, size, size, 3)), tf.float32),
                tf.constant(rng.integers(0, 10, b), tf.int32))

    train, valid = data(), data()
    print(f"config {args.config}: {m.layers} cells C={m.channels} batch {b} "
          f"{size}x{size}, {config.arch.order} order, objectives "
          f"{list(config.objectives)}; {count_params(net.weight_variables):,} "
          f"weights; threads {args.threads or 'default'}", flush=True)
    print(f"resource table: {table_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    out = step(train, valid)
    float(out["train/loss"])
    first = time.perf_counter() - t0
    print(f"time to first step: {first:.1f} s (trace + compile + step)",
          flush=True)
    for _ in range(args.warmup):
        float(step(train, valid)["train/loss"])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        float(step(train, valid)["train/loss"])
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"s/step: median {med:.3f} (min {min(times):.3f}, max "
          f"{max(times):.3f}, n={len(times)}); images/s {b / med:.2f}; "
          f"peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
        print(f"TF CPU memory info: peak {info['peak'] / 2 ** 30:.2f} GiB")
    except (ValueError, tf.errors.OpError):
        pass  # not tracked for the CPU allocator in most builds

    if not args.profile:
        return
    alpha = [a.value for a in net.arch_variables]
    w_vars = [v.value for v in net.weight_variables]

    def forward(x, y):
        return obj_lib.cross_entropy(net(x, training=True), y)

    def backward(sources):
        def fn(x, y):
            with tf.GradientTape() as tape:
                loss = forward(x, y)
            return tape.gradient(loss, sources)
        return fn

    def attack(x, y):
        return obj_lib.attack(lambda z: net(z, training=True), x, y,
                              config.attack, tf.constant([0, 0]))

    parts = {"forward": forward, "forward+backward(alpha)": backward(alpha),
             "forward+backward(w)": backward(w_vars),
             "forward+backward(alpha+w)": backward(alpha + w_vars),
             "fgsm attack": attack}
    for name, fn in parts.items():
        compiled = tf.function(fn, autograph=False)
        t0 = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), compiled(*valid))
        trace = time.perf_counter() - t0
        ts = []
        for _ in range(max(3, args.steps // 2)):
            t0 = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), compiled(*valid))
            ts.append(time.perf_counter() - t0)
        print(f"  {name:<28} {statistics.median(ts):.3f} s "
              f"(first call {trace:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
