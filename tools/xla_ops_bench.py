"""Times single convolutions with and without XLA (not a test).

Why XLA makes every workload slower on the CPU (BENCHMARKS.md): forward +
backward of each op at benchmark config A's shapes ([64, 32, 32, 16]), as
a `tf.function` with ``jit_compile`` off and on, median of ``--repeats``
calls after one warm-up call. Also the depthwise 3x3 written as 9 shifted
multiply-adds, checked against the op first.

    python tools/xla_ops_bench.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time


def _cases(tf, x):
    dw = tf.Variable(tf.random.uniform([3, 3, x.shape[-1], 1]), name="dw")
    pw = tf.Variable(tf.random.uniform([1, 1, x.shape[-1], x.shape[-1]]))
    k3 = tf.Variable(tf.random.uniform([3, 3, x.shape[-1], x.shape[-1]]))

    def taps(z):
        # Depthwise 3x3, stride 1, SAME: 9 shifted multiply-adds.
        p = tf.pad(z, [[0, 0], [1, 1], [1, 1], [0, 0]])
        h, w = z.shape[1], z.shape[2]
        return tf.add_n([p[:, i:i + h, j:j + w, :] * dw[i, j, :, 0]
                         for i in range(3) for j in range(3)])

    cases = {
        "depthwise 3x3": lambda z: tf.nn.depthwise_conv2d(
            z, dw, [1, 1, 1, 1], "SAME"),
        "depthwise 3x3 dil 2": lambda z: tf.nn.depthwise_conv2d(
            z, dw, [1, 1, 1, 1], "SAME", dilations=[2, 2]),
        "depthwise 3x3 as 9 taps": taps,
        "conv 1x1": lambda z: tf.nn.conv2d(z, pw, 1, "SAME"),
        "conv 3x3": lambda z: tf.nn.conv2d(z, k3, 1, "SAME"),
    }
    diff = float(tf.reduce_max(tf.abs(taps(x) - cases["depthwise 3x3"](x))))
    if diff > 1e-3:
        raise AssertionError(f"9-tap depthwise differs from the op by {diff}")
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", default="64,32,32,16")
    args = parser.parse_args(argv)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    x = tf.random.uniform([int(s) for s in args.shape.split(",")])
    print(f"fwd+bwd (input and weight gradients), shape {x.shape.as_list()}, "
          f"{args.threads} threads, median of {args.repeats}")
    for name, op in _cases(tf, x).items():
        times = {}
        for jit in (False, True):
            def step(z, op=op):
                with tf.GradientTape() as tape:
                    tape.watch(z)
                    loss = tf.reduce_sum(tf.nn.relu(op(z)))
                return loss, tape.gradient(loss, [z] + list(
                    tape.watched_variables()[1:]))
            fn = tf.function(step, jit_compile=jit, autograph=False)
            float(fn(x)[0])
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                float(fn(x)[0])
                runs.append(time.perf_counter() - start)
            times[jit] = statistics.median(runs)
        print(f"{name:24s} XLA off {1e3 * times[False]:8.1f} ms   "
              f"XLA on {1e3 * times[True]:8.1f} ms   "
              f"({times[True] / times[False]:.1f}x)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
