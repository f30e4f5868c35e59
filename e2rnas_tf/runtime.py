"""Process-wide TensorFlow set-up from a config: precision, graph
optimisation, determinism, seeds and the distribution strategy.

Called once by each command before any model or dataset is built.
"""

from __future__ import annotations

import keras
import tensorflow as tf

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("default", "mirrored", "multi_worker")


def configure(config):
    """Applies the runtime fields of ``config`` to this process.

    Args:
        config: a config from `e2rnas_tf.config_lib` (fields
            ``mixed_precision``, ``graph_optimization``, ``deterministic``,
            ``seed``).
    """
    if config.mixed_precision not in PRECISIONS:
        raise ValueError(
            f"Expected config.mixed_precision in {list(PRECISIONS)}. "
            f"Received: {config.mixed_precision!r}")
    keras.mixed_precision.set_global_policy(config.mixed_precision)
    # Grappler's meta optimiser takes seconds per large function on 2 cores
    # and bought no step time on the CPU in our measurements (BENCHMARKS.md).
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": not config.graph_optimization})
    keras.utils.set_random_seed(int(config.seed))
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()


def make_strategy(config):
    """The `tf.distribute.Strategy` named by ``config.strategy``."""
    name = config.strategy.name
    if name not in STRATEGIES:
        raise ValueError(
            f"Expected config.strategy.name in {list(STRATEGIES)}. "
            f"Received: {name!r}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = list(config.strategy.devices) or None
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.MultiWorkerMirroredStrategy()
